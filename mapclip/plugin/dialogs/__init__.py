"""MapCLIP's dialogs (see docs/processing.md, "Dialogs").

- :mod:`.finetune_dialog` ``FinetuneDialog``: fine-tuning with a live loss/recall plot;
  ``model_ready(path, name)`` offers the result to the dock's model picker.
- :mod:`.convert_dialog` ``ConvertDialog``: Box-to-Caption and Mask-to-Box.
- :mod:`.dedup_dialog` ``DedupDialog``: duplicate groups with thumbnails, quarantine on
  request, undo.
- :mod:`.model_manager` ``ModelManagerDialog``: presets and added models, load check;
  ``models_changed`` asks the dock to refresh its picker.

Each takes ``(iface=None, parent=None)``; all run their engine job through
:class:`plugin.tasks.EngineTask` (:mod:`.base`). The engine's torch-heavy modules
are imported inside the jobs; the fine-tune dialog reads its defaults and choices
(``FinetuneOptions``, ``FREEZE``, ``RECIPES``, ``PIR_LABELS``) from
``engine.core.options``, which needs only the standard library.
"""
