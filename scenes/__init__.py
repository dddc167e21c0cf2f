"""The scene renderer: rendered 3-D views with exact metric depth (pybullet's CPU TinyRenderer).

A data generator, not part of the pipeline's spine: the embedded demo's corpus and the tests' exact
ground truth come from here, through the `scenes:` source and evaluation set of
`pipeline.datasets.generated`. `render.render_view(seed)` is a pure function of its seed; the
other modules build what it draws (`layouts`, `props`, `meshes`, `textures`) and how it is lit
(`shading`, `photometric`).
"""
