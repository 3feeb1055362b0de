"""Text sources and tasks, ROUGE, the interpolation verdict, prepare's split/join, the plot, and the experiments'
--smoke run (tiny models, every stage and the two-process runtime; nothing written to results/)."""
import json

import pytest
import torch

from impl.kvstitch import data
from impl.kvstitch.evaluate import cut_at_eos, rouge, rouge_available
from impl.kvstitch.experiments import main as experiments_main
from impl.kvstitch.summary import interpolation_score
from impl.kvstitch.prepare import join, split

WIKI = """{{Infobox thing|a={{nested|x}}}}
'''Widget''' is a [[gadget|small device]] used in [[engineering]].<ref>Some ref</ref> It has
[[File:W.png|thumb|A [[widget]] picture]] many uses.<!-- hidden -->
{| class="wikitable"
| cell || cell
|}
== History ==
Widgets were made in [http://example.com 1900].
* a list item
=== Later ===
They spread."""


def test_wikitext_cleaning_and_lead_split():
    lead, body = data.split_lead(data.clean_wikitext(WIKI))
    assert lead == "Widget is a small device used in engineering. It has many uses."
    assert body == "Widgets were made in 1900. They spread."


def test_gensim_text_splits_are_disjoint_and_qualified():
    pytest.importorskip("gensim", reason="gensim ships the news and Wikipedia text (pip install gensim)")
    s = data.load_splits()
    assert len(s.news_train) == 240 and len(s.news_eval) == 60
    assert not set(s.news_train) & set(s.news_eval)
    assert all(len(p["lead"].split()) >= 30 and len(p["body"].split()) >= 300 for p in s.wiki_eval)
    leads = {p["lead"] for p in s.wiki_eval}
    assert not any(t.split("\n")[0] in leads for t in s.wiki_train), "a held-out page leaks into training text"
    assert all("{{" not in p["body"] and "[[" not in p["body"] for p in s.wiki_eval)


def test_tasks_have_equal_length_prompts_and_matching_references():
    codec = data.ByteCodec()
    arts = ["short", "x" * 30 + "CONTINUATION" + "y" * 50]
    t = data.news_task(codec, arts, prompt_len=31, new_tokens=12, limit=5)
    assert t.prompts.shape == (1, 31) and t.references == ["CONTINUATION"]
    pages = [{"lead": "L1", "body": "b" * 200}, {"lead": "L2", "body": "tiny"}]
    w = data.wiki_task(codec, pages, prompt_len=100, limit=5)
    assert w.prompts.shape == (1, 100) and w.references == ["L1"]
    assert codec.decode(w.prompts[0].tolist()).endswith("\n\nSummary:")
    with pytest.raises(ValueError, match="leaves"):
        data.wiki_task(codec, pages, prompt_len=40, limit=5)
    stream = data.token_stream(codec, ["ab", "c"])
    assert stream.tolist() == [1, 100, 101, 2, 1, 102, 2]
    chunks = data.random_chunks(stream, 3, 4, seed=0)
    a, b = next(chunks), next(data.random_chunks(stream, 3, 4, seed=0))
    assert a.shape == (3, 4) and torch.equal(a, b)
    with pytest.raises(ValueError, match="fewer than"):
        next(data.random_chunks(stream, 1, 50, 0))


def test_byte_codec_roundtrip_and_eos_cut():
    c = data.ByteCodec()
    assert c.decode(c.encode("héllo, wörld")) == "héllo, wörld"
    assert cut_at_eos([5, 6, 2, 7], 2) == [5, 6] and cut_at_eos([5, 6], 2) == [5, 6]


def test_rouge_scores_known_pairs():
    if not rouge_available():
        pytest.skip("rouge-score not installed (pip install rouge-score)")
    s = rouge(["the cat sat on the mat", "completely different words"], ["the cat sat on the mat", "a dog ran"])
    assert s["rouge1"] == pytest.approx(0.5) and s["rougeL"] == pytest.approx(0.5)
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)  # stemming
    with pytest.raises(ValueError, match="references"):
        rouge(["a"], [])


@pytest.mark.parametrize("d,h,p,want", [(0.1, 0.2, 0.3, 1.0), (0.1, 0.05, 0.3, 0.0), (0.1, 0.4, 0.3, 0.0),
                                        (0.1, 0.1, 0.3, 0.0), (0.3, 0.35, 0.2, 0.0), (0.1, None, 0.3, None)])
def test_interpolation_verdict(d, h, p, want):
    assert interpolation_score(d, h, p) == want


def test_prepare_split_and_join_roundtrip(tmp_path):
    src = tmp_path / "assets"
    (src / "text").mkdir(parents=True)
    blob = bytes(range(256)) * 9000
    (src / "model.gguf").write_bytes(blob)
    (src / "text" / "news_eval.jsonl").write_text('{"a": 1}\n')
    parts = split(src, tmp_path / "carry", chunk_mb=1)
    assert len(parts) == 3 and all((p / "blob").stat().st_size <= 1 << 20 for p in parts)
    out = join(tmp_path / "carry", tmp_path / "back")
    assert (out / "assets" / "model.gguf").read_bytes() == blob
    assert (out / "assets" / "text" / "news_eval.jsonl").read_text() == '{"a": 1}\n'


def test_plot_draws_from_stored_results(tmp_path):
    from impl.common.ledger import ResultsView
    from impl.kvstitch.claims import CLAIMS
    from impl.kvstitch.plots import plot_rouge_vs_size

    root = tmp_path / "results"
    view = ResultsView("h100-test", root=root)
    assert plot_rouge_vs_size(view, tmp_path) == []
    rec = {"data": {"prefill": {"params": 135e6, "rougeL": 0.3},
                    "decodes": [{"params": p, "rougeL": {"decode_alone": r, "hybrid_a": r + .02, "hybrid_b": r + .05}}
                                for p, r in ((60e6, .15), (90e6, .2))], "interpolation": 1.0}}
    (root / "h100-test" / "kvstitch").mkdir(parents=True)
    (root / "h100-test" / "kvstitch" / "rouge_smollm2.json").write_text(json.dumps(rec))
    made = plot_rouge_vs_size(ResultsView("h100-test", root=root), tmp_path)
    assert len(made) == 1 and made[0].stat().st_size > 1000
    claim = next(c for c in CLAIMS if c.id == "kvstitch.interpolation_smollm2")
    assert claim.measure(ResultsView("h100-test", root=root)).value == 1.0


def test_experiments_smoke_runs_every_stage_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("gensim", reason="the smoke run reads gensim's text (pip install gensim)")
    from impl.common.results import RESULTS

    before = sorted(p for p in RESULTS.rglob("*kvstitch*"))
    assert experiments_main(["--smoke", "--series", "smollm2", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in ("heal step 3/3", "stage a step 3/3", "stage b step 3/3", "would write rouge_smollm2",
                  "would write runtime_smollm2_cpu", "would write nccl_transfer"):
        assert stage in out, stage
    assert (tmp_path / "smollm2" / "L3_m0.5_g1" / "stitch_b" / "stitch.safetensors").exists()
    assert (tmp_path / "smollm2" / "L3_m0.5_g1" / "lora" / "adapter_config.json").exists()
    assert sorted(p for p in RESULTS.rglob("*kvstitch*")) == before


def test_news_windows_keep_the_bos_and_take_disjoint_references():
    codec = data.ByteCodec()
    art = "".join(chr(ord("a") + i % 26) for i in range(100))
    t = data.news_task(codec, [art, "too short"], prompt_len=21, new_tokens=10, limit=50, stride=10)
    body = codec.encode_plain(art)
    assert len(t.references) == t.prompts.shape[0] == (100 - 20 - 10) // 10 + 1
    for i, (p, ref) in enumerate(zip(t.prompts.tolist(), t.references)):
        s = 10 * i
        assert p == [codec.bos_id] + body[s:s + 20], i                # every window starts with BOS
        assert ref == art[s + 20:s + 30] and t.continuations[i].tolist() == body[s + 20:s + 30]
    assert data.news_task(codec, [art], 21, 10, limit=3, stride=10).prompts.shape == (3, 21)
    one = data.news_task(codec, [art], 21, 10, limit=50)                 # stride 0: the first window only
    assert one.references == [art[20:30]]
    with pytest.raises(ValueError, match="stride"):
        data.news_task(codec, [art], 21, 10, limit=5, stride=-1)


class _FakeTok:
    """A tokenizer that knows whole words (``merged``) or only two-letter pieces, with or without a BOS."""

    bos_token, bos_token_id = "<s>", 0

    def __init__(self, merged: bool, adds_bos: bool) -> None:
        self.merged, self.adds_bos = merged, adds_bos
        self.vocab = {"\u2581" + w: i + 1 for i, w in enumerate(("the", "of", "and", "in", "world", "people"))}

    def get_vocab(self) -> dict:
        return self.vocab

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]

    def __call__(self, text: str, add_special_tokens: bool = True):
        words = text.split()
        ids = [1] * len(words) if self.merged else [7] * sum((len(w) + 1) // 2 for w in words)
        return type("Enc", (), {"input_ids": ([0] if self.adds_bos and add_special_tokens else []) + ids})


def test_tokenizer_check_refuses_lost_merges_and_a_missing_bos():
    from impl.kvstitch.models import check_tokenizer

    check_tokenizer(_FakeTok(merged=True, adds_bos=True), True, "good")
    check_tokenizer(_FakeTok(merged=True, adds_bos=False), False, "no bos wanted")
    with pytest.raises(ValueError, match="merges were lost"):
        check_tokenizer(_FakeTok(merged=False, adds_bos=True), True, "broken")
    with pytest.raises(ValueError, match="BOS"):
        check_tokenizer(_FakeTok(merged=True, adds_bos=False), True, "no bos")


def test_paired_bootstrap_interval():
    from impl.kvstitch.evaluate import paired_bootstrap

    a = [[0.1, 0.2, 0.3], [0.5, 0.5]]
    same = paired_bootstrap(a, a)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0 and same["n"] == 5
    up = paired_bootstrap(a, [[x + 0.1 for x in t] for t in a])
    assert up["lo"] == pytest.approx(0.1) and up["hi"] == pytest.approx(0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, generator=g).tolist()
    y = (torch.tensor(x) + 0.02 + 0.2 * (torch.rand(400, generator=g) - 0.5)).tolist()
    r = paired_bootstrap([x[:200], x[200:]], [y[:200], y[200:]])
    assert r["lo"] < r["diff"] < r["hi"] and r["lo"] < 0.02 < r["hi"] and r["hi"] - r["lo"] < 0.03
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([[0.1]], [[0.1, 0.2]])


def test_summary_gaps_separate_a_clear_win_from_a_tie(tmp_path):
    if not rouge_available():
        pytest.skip("rouge-score not installed (pip install rouge-score)")
    from impl.kvstitch.summary import summarise

    refs = {"news": [f"the cat {i} sat on the mat" for i in range(30)]}
    good = {"news": {"generations": refs["news"], "rouge": {"rougeL": 1.0}}}
    bad = {"news": {"generations": ["zebra"] * 30, "rouge": {"rougeL": 0.0}}}
    win = {"decode_alone": bad, "hybrid_a": bad, "hybrid_b": good, "lora_alone": bad}
    tie = {"decode_alone": bad, "hybrid_a": bad, "hybrid_b": bad, "lora_alone": bad}
    rec = {"references": refs, "prefill": {"scores": good, "params": 2},
           "decodes": [{"tag": "a", "params": 1, "scores": win}, {"tag": "b", "params": 1, "scores": tie}]}
    out = summarise(rec)
    gaps = out["decodes"][0]["gaps"]
    assert gaps["hybrid_b_minus_decode"]["lo"] > 0.9                       # a clear win
    assert gaps["prefill_minus_hybrid_b"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 30}  # a tie
    # per series: the fraction of sizes that interpolate (size a sits at the prefill's score, size b never rises)
    assert [d["interpolation"] for d in out["decodes"]] == [1.0, 0.0] and out["interpolation"] == 0.5
    assert out["hybrid_gain_lo"] == 0.0                                      # the weaker size's bound
    assert gaps["hybrid_b_minus_lora_alone"]["lo"] > 0.9 and out["kv_gain_lo"] == 0.0  # over decode+LoRA alone too
    assert out["nll_interpolation"] is None                                  # a record without held-out losses
    from impl.common.ledger import ResultsView
    from impl.kvstitch.plots import rouge_tables

    assert rouge_tables(ResultsView("none", root=tmp_path)) == []            # no results: no table
    (tmp_path / "fake" / "kvstitch").mkdir(parents=True)
    (tmp_path / "fake" / "kvstitch" / "rouge_smollm2.json").write_text(json.dumps({"data": out, "device": "X"}))
    lines = rouge_tables(ResultsView("fake", root=tmp_path))
    assert "| prefill alone | 0.0M | — | — | 1.000 |" in lines  # the test record holds ROUGE-L only
    assert any(x.startswith("- a: hybrid b minus decode = +1.0000") for x in lines)


def test_series_record_is_checkpointed_after_each_decode_size(tmp_path, monkeypatch):
    pytest.importorskip("gensim", reason="the smoke recipe reads gensim's text (pip install gensim)")
    from impl.kvstitch import recipe as ex

    def fake_size(pm, size, rc, stream, tasks, codec, device, out, k):
        empty = {t.name: {"rouge": None, "generations": [""] * len(t.references)} for t in tasks}
        return {"tag": f"size{k}", "params": 1, "scores": {s: empty for s in ("decode_alone", "hybrid_a", "hybrid_b",
                                                                               "lora_alone")}}

    monkeypatch.setattr(ex, "run_decode_size", fake_size)
    rc = ex.recipe_config("smollm2", "smoke")
    rc.decode_sizes = rc.decode_sizes * 3
    seen: list[dict] = []
    rec = ex.run_series("smollm2", rc, None, "cpu", True, tmp_path, checkpoint=seen.append)
    assert [len(r["decodes"]) for r in seen] == [1, 2] and not any(r["complete"] for r in seen)
    assert rec["complete"] and [d["tag"] for d in rec["decodes"]] == ["size0", "size1", "size2"]
