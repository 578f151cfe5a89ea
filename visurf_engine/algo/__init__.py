"""The algorithm, free of models, backends and config: advantages, the gold (render, align,
score, eliminate, smooth), the paradigm registry, members and their aggregation weights.
The loss itself is the kernel package's (``visurf_kernels``)."""
