"""The output: OUT's files (the store) and the indexes written there (manifest, rejects, wids)."""
