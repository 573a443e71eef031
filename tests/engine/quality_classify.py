"""The land-cover classes the demo model's class maps are measured on (tests and scripts)."""
from engine.synthetic import CLASS_VALUE

NAMES = ["water", "forest", "field", "bare ground", "grass", "urban", "road"]
#: mask values per class: objects count as the land cover they stand on
CLASS_VALUES = [[CLASS_VALUE["water"], CLASS_VALUE["ship"]], [CLASS_VALUE["forest"]],
                [CLASS_VALUE["field"]], [CLASS_VALUE["bare-ground"], CLASS_VALUE["storage-tank"]],
                [CLASS_VALUE["grass"], CLASS_VALUE["sports-field"]],
                [CLASS_VALUE["urban"], CLASS_VALUE["building"], CLASS_VALUE["swimming-pool"]],
                [CLASS_VALUE["road"], CLASS_VALUE["vehicle"]]]
