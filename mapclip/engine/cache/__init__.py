"""Embeddings kept between questions: embed a raster once, answer every later prompt.

The expensive part of every raster job (read, resize, encode) does not depend
on the prompt. :mod:`.keys` says what an embedding pass is (the raster's
identity, the area, the tiling and read options, the model's fingerprint) and
:mod:`.store` keeps the pass's arrays under that key: in memory (LRU, bounded
in MB) and on disk under ``$MAPCLIP_CACHE/embeddings`` (bounded, oldest
evicted, atomic writes, damaged entries dropped, the whole key stored with the
entry and compared on every read, so an entry never answers for another pass).
"""
