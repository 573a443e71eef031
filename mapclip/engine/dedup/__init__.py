"""Near-duplicate images by perceptual hash: the hash maths (segments), images hashed
and cached (hashing), groups found and reported (duplicates), moved aside and back
(quarantine). Training-data hygiene; it never touches an index."""
