"""seam: stitchable ResNet34/ResNet50 families that interpolate compute and accuracy, and a server that picks the
lightest configuration meeting an accuracy constraint (SN-Net's recipe on Fashion-MNIST or any ImageFolder).

    from impl.seam import SeamServer
    server = SeamServer.from_checkpoint("out/checkpoint", device="cuda")
    server.select(0.90)                  # the cheapest configuration that can promise 90 % accuracy (else FloorError)
    labels = server.serve(images)        # class index per image (uint8 pixels, or floats in [0, 1])

Files, in the order the recipe uses them: ``models`` (anchors cut into stem/blocks/head), ``family`` (configurations,
1x1-conv stitches, per-configuration BatchNorm statistics), ``lstsq`` (least-squares stitch init), ``data``
(IDX / ImageFolder splits), ``train`` (anchors, then the family with one configuration per step), ``measure``
(accuracy, FLOPs, params, latency, interpolation rule), ``select`` (the selector and its sweep), ``serve`` (checkpoints,
``SeamServer.serve(images)`` and its CLI), ``experiments`` (the whole recipe), ``ablate`` (anchors alone under
variants of their training recipe), ``plots``, ``claims``.
"""
from impl.common.exports import lazy_exports

# lazy: the report reads seam's claims without loading torch and timm
__all__, __getattr__ = lazy_exports(__name__, {
    "serve": ("CheckpointError", "SeamServer", "load_checkpoint", "save_checkpoint"),
    "select": ("FloorError", "Promise"), "models": ("AnchorConfig",),
    "family": ("Config", "SeamFamily", "build_family"),
    "train": ("TrainConfig", "finetune_family", "train_anchor")})
