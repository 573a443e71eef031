"""Archives: the on-disk index (store), building it (build), searching it
(search, approx), retrieval metrics (retrieval) and near-duplicates (dedup)."""
