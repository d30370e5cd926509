"""The recipes of issue 24: distillation, extended infonce denominators, CoSENT / AnglE, and the score step.

Each new loss is checked against the peer's own implementation on the same random tensors where one is
installed (sentence-transformers' CoSENTLoss, AnglELoss, DistillKLDivLoss, MarginMSELoss and
MultipleNegativesRankingLoss with `directions` / `hardness_strength`), against a by-hand formula where none
is (ms-swift's dd block), across 2 gloo ranks against 1 process, and through the real Trainer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from embedtune.config import ScoreConfig, TrainConfig, resolve_env_defaults
from embedtune.distillation import (
    distill_kl_loss,
    distill_kl_reranker_loss,
    margin_mse_loss,
    margin_mse_reranker_loss,
)
from embedtune.errors import DataError, EmbedtuneError
from embedtune.launch import free_port
from embedtune.losses import angle_loss, cosent_loss, infonce_loss
from embedtune.objectives import knob_problems, objective, resolve_knobs

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")

TOL = dict(rtol=0, atol=1e-6)


def unit(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_()


def bare(cls, **attrs):
    """A sentence-transformers loss without a model (only compute_loss_from_embeddings is called)."""
    loss = cls.__new__(cls)
    torch.nn.Module.__init__(loss)
    for k, v in attrs.items():
        setattr(loss, k, v)
    return loss


def both_grads(ours, theirs, inputs):
    ga = torch.autograd.grad(ours, inputs)
    gb = torch.autograd.grad(theirs, inputs)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# --- pair losses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dim", [8, 9])  # AnglE pads an odd dimension
def test_cosent_and_angle_equal_sentence_transformers_values_and_gradients(seed, dim):
    a, b = unit(12, dim, seed=seed), unit(12, dim, seed=seed + 100)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (12,), generator=g).double() / 4  # ties on purpose
    for ours, sim in ((cosent_loss, st_util.pairwise_cos_sim), (angle_loss, st_util.pairwise_angle_sim)):
        theirs = bare(st_losses.CoSENTLoss, scale=20.0, similarity_fct=sim)
        mine, peer = ours(a, b, labels, scale=20.0), theirs.compute_loss_from_embeddings([a, b], labels)
        torch.testing.assert_close(mine, peer, **TOL)
        both_grads(mine, peer, [a, b])
    assert cosent_loss(a, b, torch.zeros(12)).item() == 0.0  # all labels tied: no ordered pair, log(1)


def test_cosent_ranks_by_label_order_only():
    a, b = unit(6, 4), unit(6, 4, seed=3)
    labels = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    same = cosent_loss(a, b, labels * 7 - 3)  # any increasing map of the labels: the same loss
    torch.testing.assert_close(cosent_loss(a, b, labels), same, **TOL)
    with torch.no_grad():  # the cosines in label order: every ordered pair already right, loss < log 2
        b_sorted = a.clone()
        cos = torch.linspace(-0.9, 0.9, 6)
        ortho = F.normalize(torch.randn(6, 4, dtype=torch.float64) - 0, dim=-1)
        ortho = F.normalize(ortho - (ortho * a).sum(-1, keepdim=True) * a, dim=-1)
        b_sorted = cos[:, None] * a + (1 - cos[:, None] ** 2).sqrt() * ortho
    assert cosent_loss(a, b_sorted, labels).item() < 0.7
    assert cosent_loss(a, b_sorted, labels.flip(0)).item() > 20  # every pair the wrong way round


# --- distillation ---------------------------------------------------------------------------------------------


def group(b=5, n=3, d=8, seed=0):
    q, pos, neg = unit(b, d, seed=seed), unit(b, d, seed=seed + 1), unit(b, n, d, seed=seed + 2)
    teacher = torch.randn(b, n + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4
    return q, pos, neg, torch.ones(b, n, dtype=torch.bool), teacher


@pytest.mark.parametrize(("t_s", "t_t"), [(1.0, 1.0), (0.05, 2.0), (0.02, 1.0)])
def test_distill_kl_is_sentence_transformers_distill_kl_div_loss_without_its_temperature_squared(t_s, t_t):
    q, pos, neg, mask, teacher = group()
    theirs = bare(
        st_losses.DistillKLDivLoss, similarity_fct=st_util.pairwise_dot_score, temperature=1.0,
        student_temperature=t_s, teacher_temperature=t_t, loss_fct=torch.nn.KLDivLoss(reduction="batchmean"),
        _checked_teacher_scale=True,
    )  # fmt: skip
    peer = theirs.compute_loss_from_embeddings([q, pos, *neg.unbind(1)], teacher)
    mine = distill_kl_loss(q, pos, neg, mask, teacher, student_temperature=t_s, teacher_temperature=t_t)
    torch.testing.assert_close(mine * t_s**2, peer, **TOL)
    both_grads(mine * t_s**2, peer, [q, pos, neg])


@pytest.mark.parametrize("n", [1, 3])
def test_margin_mse_equals_sentence_transformers_margin_mse_loss(n):
    q, pos, neg, mask, teacher = group(n=n)
    theirs = bare(
        st_losses.MarginMSELoss, similarity_fct=st_util.pairwise_dot_score, loss_fct=torch.nn.MSELoss()
    )
    peer = theirs.compute_loss_from_embeddings([q, pos, *neg.unbind(1)], teacher)
    mine = margin_mse_loss(q, pos, neg, mask, teacher, student_temperature=1.0)
    torch.testing.assert_close(mine, peer, **TOL)
    both_grads(mine, peer, [q, pos, neg])


def test_distillation_on_ragged_groups_equals_each_row_alone_and_ignores_padding():
    q, pos, neg, _, teacher = group(b=3, n=3)
    counts = [3, 1, 0]
    mask = torch.tensor([[i < c for i in range(3)] for c in counts])
    junk = teacher.clone()
    junk[~torch.cat([torch.ones(3, 1, dtype=torch.bool), mask], 1)] = 1e6  # padding slots hold garbage
    for fn in (distill_kl_loss, margin_mse_loss):
        whole = fn(q, pos, neg, mask, junk, student_temperature=0.1)
        rows = [fn(q[i : i + 1], pos[i : i + 1], neg[i : i + 1, :c], mask[i : i + 1, :c], teacher[i : i + 1, : c + 1],
                   student_temperature=0.1) for i, c in enumerate(counts)]  # fmt: skip
        if fn is distill_kl_loss:
            torch.testing.assert_close(whole, sum(rows) / 3, **TOL)  # mean over rows
        else:
            torch.testing.assert_close(whole, (rows[0] * 3 + rows[1]) / 4, **TOL)  # mean over real pairs


def test_reranker_distillation_equals_the_embedding_form_on_the_same_scores():
    q, pos, neg, mask, teacher = group()
    z = torch.cat([(q * pos).sum(-1, keepdim=True), torch.einsum("bd,bnd->bn", q, neg)], 1)  # (B, 1 + N)
    sizes = [4] * 5
    for emb_fn, rr_fn in (
        (distill_kl_loss, distill_kl_reranker_loss),
        (margin_mse_loss, margin_mse_reranker_loss),
    ):
        a = emb_fn(q, pos, neg, mask, teacher, student_temperature=0.5, teacher_temperature=2.0)
        b = rr_fn(z.flatten(), sizes, teacher.flatten(), student_temperature=0.5, teacher_temperature=2.0)
        torch.testing.assert_close(a, b, **TOL)


def test_distill_kl_with_infonce_weight_adds_infonce():
    q, pos, neg, mask, teacher = group()
    kw = dict(temperature=0.05, use_batch=True, mask_fake_negative=False)
    pure = distill_kl_loss(q, pos, neg, mask, teacher, **kw)
    mixed = distill_kl_loss(q, pos, neg, mask, teacher, infonce_weight=0.5, **kw)
    torch.testing.assert_close(mixed, pure + 0.5 * infonce_loss(q, pos, neg, mask, **kw), **TOL)


def test_the_teacher_never_gets_a_gradient():
    q, pos, neg, mask, teacher = group()
    teacher.requires_grad_()
    distill_kl_loss(q, pos, neg, mask, teacher).backward()
    assert teacher.grad is None and q.grad is not None


# --- infonce: query-query, document-document, hardness ---------------------------------------------------


def mnrl(directions, hardness=0.0):
    return bare(
        st_losses.MultipleNegativesRankingLoss, scale=20.0, similarity_fct=st_util.cos_sim, gather_across_devices=False,
        directions=directions, partition_mode="joint", hardness_mode="all_negatives" if hardness else None,
        hardness_strength=hardness,
    )  # fmt: skip


def test_infonce_include_qq_and_hardness_equal_sentence_transformers():
    q, pos, neg, mask, _ = group(b=6)
    kw = dict(temperature=0.05, use_batch=True, mask_fake_negative=False)
    cols = [q, pos, *neg.unbind(1)]  # sentence-transformers' cos_sim normalizes its inputs; so do we, first
    for ours, theirs in (
        (dict(), mnrl(("query_to_doc",))),
        (dict(include_qq=True), mnrl(("query_to_doc", "query_to_query"))),
        (dict(hardness_strength=5.0), mnrl(("query_to_doc",), 5.0)),
        (dict(hardness_strength=9.0, include_qq=True), mnrl(("query_to_doc", "query_to_query"), 9.0)),
    ):
        unit_q, unit_pos, unit_neg = (F.normalize(x, dim=-1) for x in (q, pos, neg))
        mine = infonce_loss(unit_q, unit_pos, unit_neg, mask, **kw, **ours)
        peer = theirs.compute_loss_from_embeddings(cols, None)
        torch.testing.assert_close(mine, peer, **TOL)
        both_grads(mine, peer, [q, pos, neg])


def test_infonce_include_dd_is_ms_swifts_block_and_the_fake_negative_mask_covers_it():
    """ms-swift's dd: pos_i against every document of the batch (its own hard negatives included), only its own
    positive left out. sentence-transformers' doc_to_doc differs (it drops the row's own negatives too)."""
    b, n = 4, 2
    q, pos, neg, mask, _ = group(b=b, n=n)
    docs = torch.cat(
        [pos, neg.reshape(-1, pos.shape[1])]
    )  # [positives, negatives row-major]: our column order
    dd = pos @ docs.T
    dd[torch.arange(b), torch.arange(b)] = float("-inf")
    expected = F.cross_entropy(torch.cat([q @ docs.T, dd], 1) / 0.05, torch.arange(b))
    got = infonce_loss(
        q, pos, neg, mask, temperature=0.05, use_batch=True, mask_fake_negative=False, include_dd=True
    )
    torch.testing.assert_close(got, expected, **TOL)
    # mask_fake_negative: a dd entry above the threshold (cos(q, pos) + 0.1) leaves the softmax like any other
    pos_sim = (q * pos).sum(-1, keepdim=True)
    qd, dd_raw = q @ docs.T, pos @ docs.T
    fake_qd = (qd > pos_sim + 0.1) & ~torch.eye(b, docs.shape[0], dtype=torch.bool)
    dd_m = dd.masked_fill(dd_raw > pos_sim + 0.1, float("-inf"))
    expected = F.cross_entropy(
        torch.cat([qd.masked_fill(fake_qd, float("-inf")), dd_m], 1) / 0.05, torch.arange(b)
    )
    got = infonce_loss(
        q, pos, neg, mask, temperature=0.05, use_batch=True, mask_fake_negative=True, include_dd=True
    )
    assert (dd_raw > pos_sim + 0.1).any()  # the example does mask some dd entries
    torch.testing.assert_close(got, expected, **TOL)


def test_infonce_qq_leaves_copies_of_a_query_out_by_key():
    q, pos, neg, mask, _ = group(b=3, n=1)
    q = torch.cat([q[:2], q[:1]]).detach()  # row 2 repeats row 0's query
    keys = torch.tensor(
        [[10, 1], [11, 2], [12, 1], [20, -1], [21, -1], [22, -1]]
    )  # rows 0 and 2: query key 1
    kw = dict(temperature=0.05, use_batch=True, mask_fake_negative=False, doc_keys=keys, include_qq=True)
    docs = torch.cat([pos, neg.reshape(-1, pos.shape[1])])
    qq = q @ q.T
    qq[[0, 0, 1, 2, 2], [0, 2, 1, 0, 2]] = float("-inf")  # own query and its copy
    qd = (q @ docs.T).masked_fill(
        torch.tensor([[0, 0, 1, 0, 0, 0], [0] * 6, [1, 0, 0, 0, 0, 0]], dtype=torch.bool), float("-inf")
    )
    expected = F.cross_entropy(
        torch.cat([qd, qq], 1) / 0.05, torch.arange(3)
    )  # rows 0/2: the other's positive out
    torch.testing.assert_close(infonce_loss(q, pos, neg, mask, **kw), expected, **TOL)


def test_infonce_env_vars_set_qq_and_dd_and_qq_without_batch_is_refused():
    cfg = TrainConfig(model="m", train_data="d", output_dir="o")
    env = resolve_env_defaults(cfg, {"INFONCE_INCLUDE_QQ": "true", "INFONCE_INCLUDE_DD": "1"})
    assert env.infonce_include_qq is True and env.infonce_include_dd is True
    assert resolve_env_defaults(cfg, {}).infonce_include_qq is False
    flag = resolve_env_defaults(TrainConfig(model="m", train_data="d", output_dir="o", infonce_include_qq=False),
                                {"INFONCE_INCLUDE_QQ": "true"})  # fmt: skip
    assert flag.infonce_include_qq is False  # an explicit flag wins, as for ms-swift's other variables
    off = resolve_env_defaults(
        TrainConfig(
            model="m", train_data="d", output_dir="o", infonce_use_batch=False, infonce_include_dd=True
        ),
        {},
    )
    obj = objective("infonce")
    assert knob_problems(obj, resolve_knobs(obj, off)) == [
        "infonce_include_dd: needs infonce_use_batch (the extra terms are other rows' texts)"
    ]


# --- 2 ranks == 1 process ---------------------------------------------------------------------------------------

ROWS, DIM, NEGS = 6, 5, 2


def problem():
    g = torch.Generator().manual_seed(7)
    enc = torch.nn.Linear(DIM, DIM, bias=False).double()
    with torch.no_grad():
        enc.weight.copy_(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    x = torch.randn(ROWS, 2 + NEGS, DIM, generator=g, dtype=torch.float64)
    teacher = torch.randn(ROWS, 1 + NEGS, generator=g, dtype=torch.float64) * 3
    return enc, x, teacher


CASES = {
    "distill_kl": lambda q, p, n, m, t, **kw: distill_kl_loss(
        q, p, n, m, t, student_temperature=0.1, infonce_weight=1.0, temperature=0.1, use_batch=True,
        mask_fake_negative=False, include_qq=True, include_dd=True, hardness_strength=2.0, **kw,
    ),
    "margin_mse": lambda q, p, n, m, t, **kw: margin_mse_loss(q, p, n, m, t, student_temperature=0.1, **kw),
    "infonce_qq_dd": lambda q, p, n, m, t, **kw: infonce_loss(
        q, p, n, m, temperature=0.1, use_batch=True, mask_fake_negative=True, include_qq=True, include_dd=True, **kw
    ),
}  # fmt: skip


def grads_of(case: str, rows: list[int], **kw) -> torch.Tensor:
    enc, x, teacher = problem()
    e = F.normalize(enc(x[rows]), dim=-1)
    CASES[case](
        e[:, 0], e[:, 1], e[:, 2:], torch.ones(len(rows), NEGS, dtype=torch.bool), teacher[rows], **kw
    ).backward()
    return enc.weight.grad.clone()


def _two_ranks(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for case in CASES:
        for split in (3, 4):  # equal halves, and 4 + 2 (a last partial batch)
            rows = list(range(split)) if rank == 0 else list(range(split, ROWS))
            g = grads_of(case, rows, world_size=2, rank=rank)
            dist.all_reduce(g)
            results[(case, split)] = g / 2  # what DDP and DeepSpeed apply: the mean over ranks
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_new_losses_on_two_ranks_give_the_one_process_gradients(tmp_path):
    out = tmp_path / "g.pt"
    mp.spawn(_two_ranks, args=(free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    for case in CASES:
        ref = grads_of(case, list(range(ROWS)))
        assert ref.abs().max() > 1e-3
        for split in (3, 4):
            torch.testing.assert_close(results[(case, split)], ref, rtol=0, atol=1e-9, msg=f"{case} {split}")


# --- the score step -------------------------------------------------------------------------------------------


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_separation_counts_positives_ranked_first_and_the_spread_within_rows():
    from embedtune.teacher import separation

    # [3, 1, 2]: first, std sqrt(2/3); [0.1, 0.2]: not first, std 0.05; a tie is not first, std 0.0829;
    # a row without negatives is left out
    sep = separation([[3.0, 1.0, 2.0], [0.1, 0.2], [0.5, 0.5, 0.4, 0.3], [1.0]])
    assert sep["rows"] == 3 and sep["positive_first"] == pytest.approx(1 / 3, abs=1e-4)
    assert sep["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3, abs=1e-4)
    assert sep["row_std"]["p50"] == pytest.approx(np.std([0.5, 0.5, 0.4, 0.3]), abs=1e-4)
    assert sep["row_std"]["mean"] == pytest.approx((np.sqrt(2 / 3) + 0.05 + 0.0829156) / 3, abs=1e-4)
    assert sep["flat"]  # median spread 0.083 < 0.25: temperature 1 would give near-uniform targets
    assert not separation([[3.0, 1.0, 2.0], [5.0, 0.0]])["flat"]  # logits a reranker spreads
    assert separation([[1.0], []]) == {"rows": 0}


def test_score_writes_a_reranker_teachers_logits_and_an_embedders_cosines(
    tiny_qwen3_path, fixtures_dir, tmp_path, capsys
):
    from embedtune.modeling import load_model
    from embedtune.steps import score
    from embedtune.teacher import separation

    data = fixtures_dir / "train" / "infonce.jsonl"
    given = rows_of(data)
    out = tmp_path / "scored.jsonl"
    stats = score.run(ScoreConfig(dataset=str(data), output=str(out), teacher_model=str(tiny_qwen3_path),
                                  teacher_task_type="reranker", max_length=256, score_batch_tokens=100))  # fmt: skip
    scored = rows_of(out)
    reranker = load_model(tiny_qwen3_path, "reranker", max_length=256)
    for r, s in zip(given, scored, strict=True):
        docs = [r["response"], *r.get("rejected_response", [])]
        assert {k: v for k, v in s.items() if k != "teacher_scores"} == r
        np.testing.assert_allclose(
            s["teacher_scores"], reranker.logits([r["query"]] * len(docs), docs), atol=1e-5
        )
    assert stats["rows"] == len(given) and stats["teacher_task_type"] == "reranker"
    assert stats["pairs_scored_this_run"] == sum(1 + len(r.get("rejected_response", [])) for r in given)
    assert json.loads((tmp_path / "scored.jsonl.stats.json").read_text()) == stats
    assert not list(tmp_path.glob(".*partial*"))
    assert stats["separation"] == separation([s["teacher_scores"] for s in scored])
    assert stats["separation"]["rows"] == sum(bool(r.get("rejected_response")) for r in given)
    # the warning follows the measured spread (a random tiny teacher's is whatever it is; both ways wired)
    assert ("warning: the scores spread little" in capsys.readouterr().err) == stats["separation"]["flat"]

    out = tmp_path / "cos.jsonl"
    score.run(ScoreConfig(dataset=str(data), output=str(out), teacher_model=str(tiny_qwen3_path),
                          teacher_task_type="embedding", max_length=64))  # fmt: skip
    embedder = load_model(tiny_qwen3_path, "embedding", max_length=64)
    for r, s in zip(given, rows_of(out), strict=True):
        docs = [r["response"], *r.get("rejected_response", [])]
        expected = embedder.encode(docs) @ embedder.encode([r["query"]], is_query=True)[0]
        np.testing.assert_allclose(s["teacher_scores"], expected, atol=1e-5)


def test_score_resumes_after_a_kill_from_the_last_whole_chunk(
    tiny_qwen3_path, fixtures_dir, tmp_path, monkeypatch
):
    from embedtune.steps import score

    data = fixtures_dir / "train" / "infonce.jsonl"
    cfg = dict(dataset=str(data), teacher_model=str(tiny_qwen3_path), teacher_task_type="reranker", max_length=256,
               score_chunk_rows=5)  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    score.run(ScoreConfig(output=str(whole), **cfg))
    real, calls = score.score_rows, []

    def dies_on_the_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(score, "score_rows", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        score.run(ScoreConfig(output=str(out), **cfg))
    assert not out.exists()  # nothing half-written where train would read it
    partial = tmp_path / ".out.jsonl.partial"
    with open(partial, "ab") as f:  # a chunk being appended when the kill came
        f.write(b'{"query": "half a li')
    monkeypatch.setattr(score, "score_rows", real)
    stats = score.run(ScoreConfig(output=str(out), **cfg))
    assert stats["resumed_after_row"] == 10 and stats["pairs_scored_this_run"] < 40
    assert out.read_bytes() == whole.read_bytes()
    # another teacher (or other knobs) never resumes from this one's rows
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(score, "score_rows", dies_on_the_third_chunk)
        calls.clear()
        score.run(ScoreConfig(output=str(out), **cfg))
    monkeypatch.setattr(score, "score_rows", real)
    stats = score.run(ScoreConfig(output=str(out), **{**cfg, "max_length": 200}))
    assert stats["resumed_after_row"] == 0


def test_score_refuses_bad_knobs_and_passes_through_without_a_teacher(fixtures_dir, tmp_path):
    from embedtune.steps import score

    data = fixtures_dir / "train" / "infonce.jsonl"
    with pytest.raises(EmbedtuneError, match="teacher_model: empty"):
        score.run(ScoreConfig(dataset=str(data), output=str(tmp_path / "o.jsonl")))
    with pytest.raises(EmbedtuneError, match="output: .* is the dataset input"):
        score.run(ScoreConfig(dataset=str(data), output=str(data), teacher_model="x"))
    with pytest.raises(EmbedtuneError, match="teacher_task_type"):
        ScoreConfig(dataset=str(data), output="o", teacher_task_type="cosine")
    stats = score.run(ScoreConfig(dataset=str(data), output=str(tmp_path / "p.jsonl"), passthrough=True))
    assert stats["passthrough"] and (tmp_path / "p.jsonl").read_bytes() == data.read_bytes()


# --- through the real Trainer -----------------------------------------------------------------------------------


def scored_rows(tmp_path, fixtures_dir):
    """The infonce fixture with teacher scores that rank the positive first (a made-up teacher)."""
    rows = rows_of(fixtures_dir / "train" / "infonce.jsonl")
    for r in rows:
        r["teacher_scores"] = [4.0] + [-1.0 - i for i in range(len(r.get("rejected_response", [])))]
    return write_rows(tmp_path / "scored.jsonl", rows)


def train_cfg(model, data, out, **kw):
    knobs = dict(deepspeed="none", max_steps=3, per_device_train_batch_size=4, learning_rate=1e-4, logging_steps=1,
                 max_length=32, save_steps=0)  # fmt: skip
    return TrainConfig(model=str(model), train_data=str(data), output_dir=str(out), **{**knobs, **kw})


@pytest.mark.parametrize(
    ("loss_type", "data", "extra"),
    [
        ("distill_kl", "scored", dict(distill_infonce_weight=1.0, infonce_include_qq=True)),
        ("margin_mse", "scored", {}),
        ("cosent", "sts", {}),
        ("angle", "sts", {}),
        (
            "infonce",
            "infonce",
            dict(infonce_include_qq=True, infonce_include_dd=True, infonce_hardness_strength=5.0),
        ),
    ],
)
def test_each_new_embedding_loss_trains_with_the_gradient_cache_and_matryoshka_to_the_uncached_loss(
    tiny_qwen3_path, fixtures_dir, tmp_path, loss_type, data, extra
):
    from embedtune.steps import train

    path = (
        scored_rows(tmp_path, fixtures_dir) if data == "scored" else fixtures_dir / "train" / f"{data}.jsonl"
    )
    plain = train.run(
        train_cfg(
            tiny_qwen3_path, path, tmp_path / "a", loss_type=loss_type, matryoshka_dims="32,16", **extra
        )
    )
    cached = train.run(train_cfg(tiny_qwen3_path, path, tmp_path / "b", loss_type=loss_type, matryoshka_dims="32,16",
                                 gradient_cache_chunk_size=3, **extra))  # fmt: skip
    first = [loss for _, loss in plain["loss_history"]]
    assert len(first) == 3 and all(np.isfinite(first))
    # the gradient cache: the same losses step by step (same gradients, so the same updates)
    np.testing.assert_allclose([x for _, x in cached["loss_history"]], first, rtol=1e-4)
    assert (tmp_path / "a" / "model.safetensors").exists()


@pytest.mark.parametrize("loss_type", ["distill_kl_reranker", "margin_mse_reranker"])
def test_reranker_distillation_trains(tiny_qwen3_path, fixtures_dir, tmp_path, loss_type):
    from embedtune.steps import train

    result = train.run(train_cfg(tiny_qwen3_path, scored_rows(tmp_path, fixtures_dir), tmp_path / "o",
                                 task_type="reranker", loss_type=loss_type, reranker_instruction="rank",
                                 max_length=128, per_device_train_batch_size=2, max_steps=2))  # fmt: skip
    assert all(np.isfinite([x for _, x in result["loss_history"]]))


def test_distillation_without_teacher_scores_names_the_rows_before_loading_the_model(fixtures_dir, tmp_path):
    from embedtune.steps import train

    with pytest.raises(
        DataError, match=r"lines 1, 2, .*teacher_scores: distill_kl needs teacher_scores.*embedtune score"
    ):
        train.run(train_cfg(tmp_path / "no-model", fixtures_dir / "train" / "infonce.jsonl", tmp_path / "o",
                            loss_type="distill_kl"))  # fmt: skip


@pytest.mark.slow
def test_zero3_two_ranks_score_then_distill_then_cosent(tiny_qwen3_path, fixtures_dir, tmp_path):
    """The chain users run: mine -> score with a teacher -> distill, here on 2 ranks (torchrun) with ZeRO-3,
    the gradient cache and Matryoshka; and CoSENT on 2 ranks."""
    from embedtune.steps import score, train

    data = fixtures_dir / "train" / "infonce.jsonl"
    scored = tmp_path / "scored.jsonl"
    stats = score.run(ScoreConfig(dataset=str(data), output=str(scored), teacher_model=str(tiny_qwen3_path),
                                  teacher_task_type="reranker", max_length=256, nproc=2))  # fmt: skip
    assert stats["processes"] == 2 and all("teacher_scores" in r for r in rows_of(scored))
    one = tmp_path / "one.jsonl"
    score.run(ScoreConfig(dataset=str(data), output=str(one), teacher_model=str(tiny_qwen3_path),
                          teacher_task_type="reranker", max_length=256))  # fmt: skip
    for a, b in zip(rows_of(scored), rows_of(one), strict=True):
        np.testing.assert_allclose(a["teacher_scores"], b["teacher_scores"], atol=1e-5)
    result = train.run(train_cfg(tiny_qwen3_path, scored, tmp_path / "kd", deepspeed="zero3", nproc=2,
                                 loss_type="distill_kl", distill_infonce_weight=1.0, infonce_include_dd=True,
                                 gradient_cache_chunk_size=3, matryoshka_dims="32,16", eval_data=str(scored),
                                 distill_student_temperature=0.05))  # fmt: skip
    assert result["world_size"] == 2 and all(np.isfinite([x for _, x in result["loss_history"]]))
    result = train.run(train_cfg(tiny_qwen3_path, fixtures_dir / "train" / "sts.jsonl", tmp_path / "cs",
                                 deepspeed="zero3", nproc=2, loss_type="cosent", max_steps=2))  # fmt: skip
    assert result["world_size"] == 2 and (tmp_path / "cs" / "model.safetensors").exists()


# --- mixed sources -------------------------------------------------------------------------------------------


def source_rows(tmp_path, counts=(("nli", 10), ("qa", 10), ("code", 6))):
    rows = [
        {"query": f"{s} question {i} about things", "response": f"{s} answer {i} text", "source": s,
         "rejected_response": [f"{s} wrong {i}"]}
        for s, n in counts for i in range(n)
    ]  # fmt: skip
    return write_rows(tmp_path / "mixed.jsonl", rows), rows


@pytest.mark.parametrize("sampling", ["round_robin", "proportional"])
def test_one_source_batches_are_seeded_and_follow_the_mode(sampling):
    from embedtune.batching import LengthGroupedSampler

    sources = ["a"] * 17 + ["b"] * 9 + ["c"] * 30
    lengths = [(i * 7) % 13 + 1 for i in range(len(sources))]
    sampler = LengthGroupedSampler(lengths, 4, seed=5, sources=sources, sampling=sampling)
    order = list(sampler)
    assert len(order) == len(sampler) and len(set(order)) == len(order)  # every row at most once
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert all(len(b) == 4 and len({sources[i] for i in b}) == 1 for b in batches)
    of = [sources[b[0]] for b in batches]
    if sampling == "round_robin":  # a, b, c in turn until b (2 full batches) runs out
        assert of == ["a", "b", "c", "a", "b", "c"]
    else:  # every full batch of every source, in a shuffled order
        assert sorted(of) == ["a"] * 4 + ["b"] * 2 + ["c"] * 7 and of != sorted(of)
    assert list(LengthGroupedSampler(lengths, 4, seed=5, sources=sources, sampling=sampling)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_a_source_without_in_batch_negatives_scores_only_its_own_documents(tiny_qwen3_path, tmp_path):
    from embedtune.batching import Collator, tokenize_rows
    from embedtune.modeling import Embedder

    _, rows = source_rows(tmp_path)
    model = Embedder.from_pretrained(tiny_qwen3_path, max_length=32)
    feats = tokenize_rows(model, rows)
    obj = objective("infonce")
    collate = Collator(obj, model.tokenizer.pad_token_id, knobs={}, without_in_batch=frozenset({"code"}))
    assert "in_batch_negatives" not in collate(feats[:4])  # nli
    assert "in_batch_negatives" not in collate([feats[0], feats[-1]])  # mixed (an eval batch): as configured
    code = collate(feats[-4:])
    assert not bool(code["in_batch_negatives"])
    from embedtune.batching import LAYOUTS

    out = model(code["features"]).double()
    knobs = resolve_knobs(obj)
    extras = {k: v for k, v in code.items() if k != "features"}
    got = LAYOUTS["query_docs"].loss(obj.function, out, **extras, **knobs)
    b = 4
    own = infonce_loss(out[:b], out[b : 2 * b], out[2 * b :], code["neg_mask"],
                       **{**knobs, "use_batch": False})  # fmt: skip
    torch.testing.assert_close(got, own, **TOL)


def test_queries_get_the_rows_instruction_then_the_sources_then_the_models(tiny_qwen3_path):
    from embedtune.batching import tokenize_rows
    from embedtune.modeling import Embedder

    model = Embedder.from_pretrained(tiny_qwen3_path, max_length=32, query_instruction="M: ")
    rows = [
        {"query": "cats", "response": "a", "source": "qa", "instruction": "Own: "},
        {"query": "cats", "response": "b", "source": "qa"},
        {"query": "cats", "response": "c", "source": "nli"},
    ]
    feats = tokenize_rows(model, rows, {"qa": "Src: "})
    want = ["Own: cats", "Src: cats", "M: cats"]
    for f, text in zip(feats, want, strict=True):
        assert f["query"].tolist() == model.tokenize([text], padding=False)["input_ids"][0]
    assert len({f["text_keys"][0] for f in feats}) == 3  # three different queries to the model


def test_source_knobs_are_checked_before_loading(fixtures_dir, tmp_path):
    from embedtune.steps import train

    data, _ = source_rows(tmp_path)
    for kw, message in (
        (
            dict(source_in_batch_negatives='{"code": false}'),
            "needs batch_sampling round_robin or proportional",
        ),
        (dict(source_instructions="{bad"), "source_instructions: not JSON"),
        (dict(source_in_batch_negatives='{"code": "no"}'), "JSON object of source -> bool"),
        (dict(batch_sampling="zipf"), "batch_sampling: 'zipf' is not one of"),
    ):
        with pytest.raises(EmbedtuneError, match=message):
            train.run(train_cfg(tmp_path / "no-model", data, tmp_path / "o", **kw))
    bare = write_rows(tmp_path / "bare.jsonl", [{"query": "q", "response": "r", "source": "code"}] * 2)
    with pytest.raises(
        DataError, match=r"bare.jsonl lines 1, 2: rejected_response: the row's source scores no in-batch"
    ):
        train.run(train_cfg(tmp_path / "no-model", bare, tmp_path / "o", batch_sampling="proportional",
                            source_in_batch_negatives='{"code": false}'))  # fmt: skip


def test_round_robin_training_resumes_exactly(tiny_qwen3_path, tmp_path, monkeypatch):
    from embedtune.steps import train
    from embedtune.trainer import StepLog

    data, _ = source_rows(tmp_path, (("nli", 12), ("qa", 12), ("code", 8)))
    kw = dict(batch_sampling="round_robin", source_in_batch_negatives='{"code": false}',
              source_instructions='{"qa": "Q: "}', save_steps=2, max_steps=5, num_train_epochs=2)  # fmt: skip
    whole = train.run(train_cfg(tiny_qwen3_path, data, tmp_path / "whole", **kw))

    class Preempted(Exception):
        pass

    def die(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise Preempted

    cfg = train_cfg(tiny_qwen3_path, data, tmp_path / "out", **kw)
    with monkeypatch.context() as m:
        m.setattr(StepLog, "on_save", die, raising=False)
        with pytest.raises(Preempted):
            train.run(cfg)
    result = train.run(cfg)
    assert result["resumed_from_step"] == 4 and result["global_step"] == whole["global_step"] == 5
    np.testing.assert_allclose(result["loss_history"], whole["loss_history"], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_zero3_two_ranks_keep_checkpoint_weights_that_merge_reads(
    tiny_qwen3_path, fixtures_dir, tmp_path, train_type
):
    """Under ZeRO-3 the checkpoints' weights are gathered (stage3_gather_16bit_weights_on_model_save) and kept
    whole; merge_with checkpoints loads them like the final model."""
    from safetensors.torch import load_file

    from embedtune.config import MergeConfig
    from embedtune.modeling import Embedder
    from embedtune.steps import merge, train

    out = tmp_path / "t"
    train.run(train_cfg(tiny_qwen3_path, fixtures_dir / "train" / "infonce.jsonl", out, deepspeed="zero3", nproc=2,
                        max_steps=4, save_steps=1, save_total_limit=3, keep_checkpoint_weights=2,
                        train_type=train_type, lora_rank=4, lora_alpha=8))  # fmt: skip
    kept = sorted(p.name for p in (out / "checkpoint-weights").iterdir())
    assert kept == ["step-2.safetensors", "step-3.safetensors"]
    names = set(Embedder.from_pretrained(out).inner.state_dict())
    assert all(set(load_file(out / "checkpoint-weights" / k)) == names for k in kept)
    result = merge.run(MergeConfig(adapter=str(out), output=str(tmp_path / "m"), merge_method="slerp",
                                   merge_with="checkpoints"))  # fmt: skip
    assert result["weight_merge"]["other"] == "step-2, step-3" and result["weight_merge"]["merged"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss_type", "data", "extra"),
    [
        ("margin_mse", "scored", dict(matryoshka_dims="32,16")),
        ("angle", "sts", dict(matryoshka_dims="32,16")),
        (
            "infonce",
            "infonce",
            dict(
                infonce_include_qq=True,
                infonce_include_dd=True,
                infonce_hardness_strength=5.0,
                matryoshka_dims="32,16",
            ),
        ),  # fmt: skip
        (
            "distill_kl_reranker",
            "scored",
            dict(task_type="reranker", reranker_instruction="rank", max_length=128),
        ),
        (
            "margin_mse_reranker",
            "scored",
            dict(task_type="reranker", reranker_instruction="rank", max_length=128),
        ),
    ],
)
def test_zero3_two_ranks_with_the_gradient_cache_trains_every_new_loss(
    tiny_qwen3_path, fixtures_dir, tmp_path, loss_type, data, extra
):
    from embedtune.steps import train

    path = (
        scored_rows(tmp_path, fixtures_dir) if data == "scored" else fixtures_dir / "train" / f"{data}.jsonl"
    )
    result = train.run(train_cfg(tiny_qwen3_path, path, tmp_path / "o", deepspeed="zero3", nproc=2, max_steps=2,
                                 per_device_train_batch_size=2, gradient_cache_chunk_size=3, loss_type=loss_type,
                                 **extra))  # fmt: skip
    assert result["world_size"] == 2 and result["global_step"] == 2
    assert all(np.isfinite([x for _, x in result["loss_history"]]))
