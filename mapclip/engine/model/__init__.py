"""Models: presets, per-model defaults and loading (models), image and text
encoding (encode), prompt banks and scores (scoring), dense patch features
(dense), batches on the device (batching)."""
