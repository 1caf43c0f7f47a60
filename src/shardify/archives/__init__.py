"""Archives: where the download's zips are, what they hold, and reading their members.

- `model`: the member model (extents, archives, members, member tables and references), plain
  immutable data;
- `discovery`: SOURCE arguments -> archives (folders, zips, pieces, volumes, download.tar);
- `zipdir`: an archive's member table (central directory, Zip64, recovery, hostile members);
- `reader`: member bytes (positioned reads, inflate, CRC-32).
"""
