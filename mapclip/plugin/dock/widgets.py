"""The dock's shared pieces: the choices it offers, item roles, the scroll area and results list."""
from __future__ import annotations

from typing import Any, Sequence, Tuple

from qgis.PyQt.QtCore import QEvent, QSize, Qt
from qgis.PyQt.QtWidgets import QFrame, QScrollArea, QTreeWidget, QWidget

from .. import layers

MODES = (("boxes", "Boxes"), ("heatmap", "Heatmap (and boxes)"), ("count", "Count"),
         ("classes", "Classes (land-cover map)"))
AREAS = (("extent", "Visible map extent"), ("layer", "Whole layer"),
         ("selection", "Selected features of a polygon layer"))
COUNT_METHODS = ("both", "prompt", "dense")
ROLE_BOUNDS = Qt.UserRole + 1
ROLE_CRS = Qt.UserRole + 2
#: Describe: the raster a result row was found in, and its feature ([layer id, feature id])
ROLE_RASTER = Qt.UserRole + 3
ROLE_FEATURE = Qt.UserRole + 4
#: the results lists' caption column (Describe)
CAPTION_COLUMN = 3
#: the results lists keep at least this height however tall the fields above them grow
RESULTS_MIN_HEIGHT = 120


class FieldsScroll(QScrollArea):
    """A tab's fields in a frameless vertical scroll area. It asks for at most
    ``HINT_HEIGHT`` pixels (the dock fits a small screen, whatever is expanded), grows no
    taller than its fields need, and scrolls when the dock is shorter than they are."""

    HINT_HEIGHT = 220

    def __init__(self, inner: QWidget):
        super().__init__()
        self.setWidget(inner)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        inner.installEventFilter(self)
        self._fit()

    def _fit(self) -> None:
        self.setMaximumHeight(self.widget().sizeHint().height())
        self.updateGeometry()

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt's name)
        if obj is self.widget() and event.type() == QEvent.LayoutRequest:
            self._fit()      # Advanced opened or closed: as tall as the fields now need
        return super().eventFilter(obj, event)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = self.widget().sizeHint()
        return QSize(hint.width() + self.verticalScrollBar().sizeHint().width(),
                     min(hint.height(), self.HINT_HEIGHT))

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(self.widget().minimumSizeHint().width(),
                     min(self.widget().sizeHint().height(), RESULTS_MIN_HEIGHT))


class ResultsList(QTreeWidget):
    """A results list that asks for no more height than it needs to be useful (the dock
    fits a small screen) and takes whatever the dock has left."""

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(super().sizeHint().width(), RESULTS_MIN_HEIGHT + 20)


def features_by(made: Sequence[Any], keys: Tuple[str, ...]) -> dict:
    """{(values of ``keys``): [layer id, feature id]} over the vector layers in ``made`` that
    have those fields (a result row finds its feature by prompt and rank, or rank)."""
    out = {}
    for layer in made:
        fields = getattr(layer, "fields", None)
        if fields is None or any(layer.fields().indexOf(k) < 0 for k in keys):
            continue
        for f in layer.getFeatures():
            key = tuple(int(f[k]) if k == "rank" else f[k] for k in keys)
            out.setdefault(key, [layer.id(), int(f.id())])
    return out
