"""Models: the presets (presets), model files from the network (hub), open_clip
architectures (architectures), checkpoint files read and recognised (checkpoints),
a spec resolved to config and weights (specs), loading and saving (models), image
and text encoding (encode), prompt banks and scores (scoring), dense patch features
(dense), batches on the device (batching)."""
