"""Image transforms done while converting: crop to the object's outline, resize, re-encode.

`options` says what was asked, `geometry` maps a label's coordinates (pure, JSON in and out),
`pixels` decodes, crops, resamples and encodes one image, `sample` puts both together for a
worker, and `estimate` measures output sizes on a few samples so the planner can cut shards.
"""
