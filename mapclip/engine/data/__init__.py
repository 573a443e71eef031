"""Data for training and tests: annotations and captions read from datasets
(annotations, captions), words (grammar), Box-to-Caption and Mask-to-Box
(box_caption, mask_box) and synthetic scenes (synthetic)."""
