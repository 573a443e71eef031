"""Reading rasters: the reader, bands and stretch (reader); tiles read ahead
in batches (batches)."""
