"""Writing: the tar layout of a sample, one shard, and the executor that writes them all.

- `tar`: a sample's members, their bytes and sizes (the planner's sizes come from here too);
- `images`: cheap structural checks that an image is whole;
- `shard`: one planned shard -> a staged tar file and its entry (the truth of what was written);
- `executor`: who runs the jobs (inline, a forked local pool) and the one publishing thread.
- `ray_executor`: the same jobs as Ray tasks (`convert --executor ray`).
"""
