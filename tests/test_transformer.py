"""The hand-written layer step equals transformers' own LlamaDecoderLayer forward."""
import pytest
import torch
import torch.nn.functional as F

from chroma_agent.model.transformer import KVCache


@pytest.mark.parametrize("part", ["backbone", "decoder"])
def test_step_equals_transformers_layers(model, part):
    stack = getattr(model, part).model
    cfg = stack.config
    torch.manual_seed(0)
    ours, ref = KVCache(cfg, 16), KVCache(cfg, 16)
    with torch.inference_mode():
        for n, pos in [(5, [0, 1, 2, 3, 4]), (2, [5, 5]), (1, [6]), (3, [7, 8, 9])]:
            x = torch.randn(1, n, cfg.hidden_size)
            positions = torch.tensor(pos)
            a = stack(x, ours, positions)
            b = stack.reference_forward(x, ref, positions)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert ours.length == ref.length
        for ka, kb in zip(ours.keys + ours.values, ref.keys + ref.values):
            torch.testing.assert_close(ka[:, :, :ours.length], kb[:, :, :ref.length], atol=1e-5, rtol=1e-5)


def test_full_cache_is_an_error(model):
    stack = model.decoder.model
    cache = KVCache(stack.config, 2)
    with torch.inference_mode():
        stack(torch.zeros(1, 2, stack.config.hidden_size), cache, torch.tensor([0, 0]))
        with pytest.raises(RuntimeError, match="KV cache full"):
            stack(torch.zeros(1, 1, stack.config.hidden_size), cache, torch.tensor([1]))


def test_reasoner_equals_transformers_thinker(model, golden_cases):
    """Prefill (with audio) and decode steps match transformers' own thinker forward."""
    from transformers import DynamicCache

    from chroma_agent.runtime.generation import Reasoner
    from chroma_agent.model.processor import ReasonerInput

    case = next(c for c in golden_cases if c.get("user_audio_16k"))
    import numpy as np
    proc = model.processor
    features, mask = proc.features(proc.load_user_audio(np.asarray(case["user_audio_16k"], np.float32), 16000))
    ids = torch.tensor([case["thinker_input_ids"]])
    thinker = model.thinker
    with torch.inference_mode():
        reasoner = Reasoner(model, capacity=8)  # small: exercises growth
        h, t = reasoner.prefill(ReasonerInput(ids, features, mask))
        cache = DynamicCache(config=thinker.config.text_config)
        out = thinker.model(input_ids=ids, input_features=features, feature_attention_mask=mask,
                            attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
        torch.testing.assert_close(h, out.last_hidden_state[:, -1], atol=1e-5, rtol=1e-5)
        assert t == int(thinker.lm_head(out.last_hidden_state[:, -1]).argmax())
        for step in range(3):
            h, t_next = reasoner.step(t)
            n = ids.shape[1] + step
            pos = torch.full((3, 1, 1), n)
            out = thinker.model.language_model(input_ids=torch.tensor([[t]]), position_ids=pos,
                                               past_key_values=cache, use_cache=True)
            torch.testing.assert_close(h, out.last_hidden_state[:, -1], atol=1e-5, rtol=1e-5)
            t = t_next
        reasoner.rewind(ids.shape[1])
        assert reasoner.length == ids.shape[1] and reasoner.next_position == ids.shape[1]


def test_reasoner_step_in_halves_equals_one_step(model):
    from chroma_agent.runtime.generation import Reasoner, _finish
    from chroma_agent.model.processor import ReasonerInput

    prompt = ReasonerInput(torch.tensor([[5, 6, 7, 8, 9]]))
    with torch.inference_mode():
        whole, halves = Reasoner(model), Reasoner(model)
        _, t = whole.prefill(prompt)
        halves.prefill(prompt)
        h1, t1 = whole.step(t)
        step = halves.step_in_halves(t)
        next(step)  # paused half-way: nothing is committed yet
        assert halves.length == whole.length - 1
        h2, t2 = _finish(step)
        assert t1 == t2 and halves.length == whole.length and halves.next_position == whole.next_position
        torch.testing.assert_close(h1, h2, atol=1e-6, rtol=1e-6)
        # a step abandoned half-way leaves the reasoner as it was
        step = halves.step_in_halves(t2)
        next(step)
        step.close()
        assert halves.length == whole.length


def test_static_forward_equals_dynamic(model):
    """The fixed-shape (CUDA-graph) step gives the dynamic step's outputs and cache."""
    stack = model.backbone.model
    cfg = stack.config
    torch.manual_seed(1)
    dynamic, static = KVCache(cfg, 12), KVCache(cfg, 12)
    with torch.inference_mode():
        for n in (4, 3, 1, 2):
            x = torch.randn(1, n, cfg.hidden_size)
            slots = torch.arange(static.length, static.length + n)
            a = stack(x, dynamic, slots)
            b = stack.forward_static(x, static, slots)
            static.length += n
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for ka, kb in zip(dynamic.keys, static.keys):
            torch.testing.assert_close(ka[:, :, :10], kb[:, :, :10])


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_projection_paths_equal_f_linear(rows):
    """Every way `Projection` runs a matmul (row blocks through bmm for one row; W @ x^T or
    oneDNN for a few rows; F.linear) gives F.linear's result, with and without a bias."""
    from chroma_agent.model.matmul import Projection

    gen = torch.Generator().manual_seed(rows)
    for shape in ((1032, 2048), (1032, 512), (1031, 512)):  # the last one's rows do not split
        weight = torch.randn(*shape, generator=gen) / shape[1] ** 0.5  # outputs of order 1
        bias = torch.randn(shape[0], generator=gen)
        x = torch.randn(1, rows, shape[1], generator=gen)
        paths = Projection(weight).candidates(rows)
        assert paths == (["linear"] if rows > 8 else
                         ["linear", "split"] if rows == 1 and shape[0] % 2 == 0 else
                         ["linear"] if rows == 1 else ["linear", "weight_first", "onednn"])
        for path in paths:
            for b in (None, bias):
                projection = Projection(weight, b, one_row=path, few_rows=path)
                torch.testing.assert_close(projection(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
        if "onednn" in paths:  # it reads a packed copy of the weight: stale after an edit
            projection = Projection(weight, few_rows="onednn")
            projection(x)
            weight.mul_(2)
            assert not torch.allclose(projection(x), F.linear(x, weight), rtol=1e-5, atol=1e-4)
            projection.forget_packed()
            torch.testing.assert_close(projection(x), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_projection_plan_is_measured_once_per_shape():
    """The first call with one row (and the first with 2-8 rows) chooses a path among the
    candidates by timing them; another weight of the same shape reuses the choice; F.linear
    is kept unless another path is clearly faster."""
    from chroma_agent.model import matmul
    from chroma_agent.model.matmul import Projection, projection_plans

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(264, 96, generator=gen)
    x1, x3 = torch.randn(1, 96, generator=gen), torch.randn(3, 96, generator=gen)
    projection = Projection(weight)
    assert projection.one_row is None and projection.few_rows is None
    rng = torch.get_rng_state()
    torch.testing.assert_close(projection(x1), F.linear(x1, weight), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.get_rng_state(), rng)  # measuring left the global generator alone
    assert projection.one_row in projection.candidates(1) and projection.few_rows is None
    torch.testing.assert_close(projection(x3), F.linear(x3, weight), rtol=1e-5, atol=1e-5)
    assert projection.few_rows in projection.candidates(3)
    plans = projection_plans()
    assert plans[f"264x96 float32 no-bias 1 row {torch.get_num_threads()} threads"] == projection.one_row
    assert plans[f"264x96 float32 no-bias 2-8 rows {torch.get_num_threads()} threads"] == projection.few_rows
    other = Projection(weight.clone())
    assert other.plan(1) == projection.one_row and len(projection_plans()) == len(plans)  # not measured again
    assert matmul._fastest({"linear": 1.0, "split": 0.95}) == "linear"  # not clearly faster
    assert matmul._fastest({"linear": 1.0, "split": 0.5, "onednn": 0.8}) == "split"
    assert matmul._fastest({"linear": 0.7, "weight_first": 0.65}) == "linear"
    if torch.cuda.is_available():
        assert Projection(weight.cuda()).candidates(1) == ["linear"]


def test_projection_plan_can_be_pinned_to_f_linear(monkeypatch):
    """CHROMA_AGENT_MATMUL=linear: no timing, F.linear for every row count."""
    from chroma_agent.model.matmul import Projection, projection_plans

    monkeypatch.setenv("CHROMA_AGENT_MATMUL", "linear")
    weight = torch.randn(272, 104)
    projection = Projection(weight)
    projection(torch.randn(1, 104))
    projection(torch.randn(3, 104))
    assert (projection.one_row, projection.few_rows) == ("linear", "linear")
    assert not any(key.startswith("272x104 ") for key in projection_plans())  # nothing was measured
    monkeypatch.setenv("CHROMA_AGENT_MATMUL", "fast")
    with pytest.raises(ValueError, match="CHROMA_AGENT_MATMUL='fast'"):
        Projection(weight)(torch.randn(1, 104))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_projection_in_half_precision(dtype):
    """The CPU paths in bf16 and fp16 (oneDNN has no fp16 matmul on most CPUs: W @ x^T then)."""
    from chroma_agent.model.matmul import Projection

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(1024, 2048, generator=gen) / 2048 ** 0.5).to(dtype)
    for rows in (1, 3):
        x = torch.randn(1, rows, 2048, generator=gen).to(dtype)
        torch.testing.assert_close(Projection(weight)(x).float(), F.linear(x, weight).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n, masked", [(1, False), (3, True), (3, False)])
def test_few_query_attention_equals_sdpa(n, masked):
    """The CPU attention for a few queries over a long cache equals SDPA (grouped heads,
    no mask, a random mask, or the causal mask of n new queries after the cache)."""
    from chroma_agent.model.transformer import attend_few, attention_mask

    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, 8, n, 16, generator=gen)
    keys, values = torch.randn(1, 2, 200, 16, generator=gen), torch.randn(1, 2, 200, 16, generator=gen)
    mask = torch.rand(n, 200, generator=gen) > 0.3 if masked else None
    if mask is not None:
        mask[:, 0] = True
    if n > 1 and not masked:
        mask = attention_mask(n, 200 - n, "cpu")[0]  # what attention_block passes after 197 cached keys
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(attend_few(q, keys, values, mask, 0.25), expected)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


@needs_onednn
def test_batch_invariant_rows_are_bucketed_without_changing_a_bit():
    """In batch-invariant mode each row gets the bits it gets alone at every row count,
    also past a chunk and at counts that are padded up to a bucket; and the counts oneDNN
    runs at are a small fixed set (each new one cost a cached kernel of ~0.5 MB)."""
    from chroma_agent.model.matmul import INVARIANT_CHUNK, INVARIANT_ROW_COUNTS, Projection, batch_invariant, invariant_rows

    torch.manual_seed(0)
    projection = Projection(torch.randn(96, 64) / 8, torch.randn(96))
    x = torch.randn(300, 64)
    with torch.inference_mode(), batch_invariant():
        alone = torch.cat([projection(row) for row in x.split(1)])
        for n in (2, 5, 9, 17, 100, INVARIANT_CHUNK, INVARIANT_CHUNK + 1, 300):
            assert torch.equal(projection(x[:n]), alone[:n]), n
    assert len(INVARIANT_ROW_COUNTS) <= 12
    assert {invariant_rows(n) for n in range(1, INVARIANT_CHUNK + 1)} == set(INVARIANT_ROW_COUNTS)
    assert all(n <= invariant_rows(n) < n + 32 for n in range(1, INVARIANT_CHUNK + 1))


@needs_onednn
def test_warmed_projection_makes_no_kernel_while_serving(capfd):
    """After `warm_invariant`, batch-invariant calls at any row count (and another weight of
    the same shape) find every oneDNN kernel made: nothing is compiled or cached while
    serving, so a server's memory stops growing with each new prefill length. Checked with
    oneDNN's own log of primitive creation (a cache miss = a new kernel); without the
    warm-up the same calls do miss, so the check can fail."""
    from chroma_agent.model.matmul import Projection, batch_invariant

    def misses(projections, counts):
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION), \
                torch.inference_mode(), batch_invariant():
            for n in counts:
                for projection in projections:
                    projection(torch.randn(n, projection.weight.shape[1]))
        return capfd.readouterr().out.count("cache_miss")

    torch.manual_seed(0)
    cold = Projection(torch.randn(80, 48))
    assert misses([cold], [3, 40, 70]) > 0
    warm, same_shape = Projection(torch.randn(112, 48)), Projection(torch.randn(112, 48))
    warm.warm_invariant()
    assert misses([warm, same_shape], range(1, 300)) == 0
