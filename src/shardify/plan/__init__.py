"""Planning: pure functions over the member tables and the dataset profile, no payload I/O.

- `pairing`: images <-> labels by stem; everything that does not pair is a reject with a reason;
- `split`: groups (batteries) to train/val/test, seeded and stratified;
- `shards`: samples ordered and cut into shards under the size limit;
- `fingerprint`: a hash of the plan, so a resumed run knows it is the same run.
"""
