"""seam: stitchable ResNet34/ResNet50 families that interpolate compute and accuracy, and a server that picks the
lightest configuration meeting an accuracy constraint (SN-Net's recipe on Fashion-MNIST or any ImageFolder).

Files, in the order the recipe uses them: ``models`` (anchors cut into stem/blocks/head), ``family`` (configurations,
1x1-conv stitches, per-configuration BatchNorm statistics), ``lstsq`` (least-squares stitch init), ``data``
(IDX / ImageFolder splits), ``train`` (anchors, then the family with one configuration per step), ``measure``
(accuracy, FLOPs, params, latency, interpolation rule), ``select`` (the selector and its sweep), ``serve`` (checkpoints,
``SeamServer.serve(images)`` and its CLI), ``experiments`` (the whole recipe), ``plots``, ``claims``.
"""
