"""llm_sft.generate: sampling, HF-parity beam search and trie-constrained beam search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny import random_hf_qwen  # noqa: E402

from eval.decoding import Trie, filter_logits  # noqa: E402
from llm_sft.generate import generate, last_hidden  # noqa: E402
from llm_sft.params import load_hf  # noqa: E402

VOCAB, EOS, PAD, STEPS = 96, 5, 95, 16
SAMPLES = 600  # Sampled continuations per prompt.
LENGTHS = (9, 5, 2)  # Left-padded prompt lengths.
ALPHABET = range(6, 14)  # Title tokens: a small alphabet so that titles share prefixes.
TRIE_PADDING = dict(min_nodes=128, min_fanout=16)  # One compiled shape for all catalogues.
TRIE_BEAMS = 8


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """The tiny torch model runs ~30x faster on one thread than on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(hf, flax model) of a tiny untied Qwen2 whose EOS logit is lifted so that beams end
    at varied lengths: the EOS row of lm_head is a multiple of the mean final hidden state."""
    hf = random_hf_qwen("Qwen2", vocab_size=VOCAB, tie_word_embeddings=False)
    with torch.no_grad():
        probe = torch.randint(1, VOCAB, (64, 12))
        hidden = hf(input_ids=probe, output_hidden_states=True).hidden_states[-1]
        mean = hidden.reshape(-1, 32).mean(0)
        hf.lm_head.weight[EOS] = mean / mean.norm() ** 2
    path = tmp_path_factory.mktemp("qwen2_eos")
    hf.save_pretrained(path, safe_serialization=True)
    model, _ = load_hf(path)
    return hf, model


def _prompts():
    rng = np.random.default_rng(0)
    length = max(LENGTHS)
    mask = (np.arange(length)[None] >= length - np.array(LENGTHS)[:, None]).astype(np.int64)
    ids = np.where(mask > 0, rng.integers(14, PAD, mask.shape), 0)
    return ids, mask


def _hf_next_logprobs(hf, ids, mask):
    """[B, V] HF log-probs of the token after each (left-padded) prompt."""
    with torch.no_grad():
        logits = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0)),
        ).logits[:, -1]
    return torch.log_softmax(logits.double(), -1).numpy()


def _hf_loglik(hf, prompt: np.ndarray, continuations: list[list[int]]) -> np.ndarray:
    """Exhaustive scoring: [N] sum of log p(continuation | unpadded prompt) under HF."""
    width = max(map(len, continuations))
    rows = [list(prompt) + c + [PAD] * (width - len(c)) for c in continuations]
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=torch.tensor(rows)).logits.double(), -1).numpy()
    steps = len(prompt) - 1 + np.arange(width)
    return np.array([logp[i, steps[: len(c)], c].sum() for i, c in enumerate(continuations)])


def _sample(model, ids, mask, **kwargs):
    """SAMPLES draws per prompt (one compiled shape for every sampling test)."""
    return generate(model, ids, mask, method="sample", max_new_tokens=STEPS,
                    num_return_sequences=SAMPLES, eos_token_id=EOS, pad_token_id=PAD,
                    **kwargs)  # fmt: skip


def test_low_temperature_and_top_k_1_sampling_equal_greedy(models):
    hf, model = models
    ids, mask = _prompts()
    greedy = generate(model, ids, mask, max_new_tokens=STEPS, eos_token_id=EOS, pad_token_id=PAD)
    assert greedy.sequences.shape == (len(LENGTHS), 1, STEPS)
    cold = _sample(model, ids, mask, temperature=1e-4, rng=jax.random.key(1))
    top1 = _sample(model, ids, mask, top_k=1, rng=jax.random.key(2))
    assert (np.asarray(cold.sequences) == np.asarray(greedy.sequences)).all()
    assert (np.asarray(top1.sequences) == np.asarray(greedy.sequences)).all()
    # The greedy score is the teacher-forced log-likelihood of the emitted tokens.
    tokens = np.asarray(greedy.sequences[:, 0])
    assert (tokens == EOS).any() and (tokens == PAD).any()  # Some row stopped early.
    for b, length in enumerate(LENGTHS):
        stop = int(np.argmax(tokens[b] == EOS)) + 1 if EOS in tokens[b] else STEPS
        expected = _hf_loglik(hf, ids[b, -length:], [list(tokens[b, :stop])])[0]
        np.testing.assert_allclose(float(greedy.scores[b, 0]), expected, atol=1e-4)


def _filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """Reference: softmax(logits / T) restricted to the top-k, then top-p, set."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    mass, nucleus = 0.0, np.zeros(len(z), bool)
    for i in order:
        if keep[i] and mass < top_p:
            nucleus[i] = True
            mass += p[i]
    p = np.where(nucleus, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def _assert_frequencies(samples: np.ndarray, expected: np.ndarray):
    freq = np.bincount(samples, minlength=len(expected)) / len(samples)
    assert (freq[expected == 0] == 0).all(), "sampled a token outside the top-k/top-p set"
    tolerance = 5 * np.sqrt(expected * (1 - expected) / len(samples)) + 1e-3
    assert (np.abs(freq - expected) <= tolerance).all(), (freq, expected)


@jax.jit
def _filtered_sample(logits, top_k, top_p):
    return jax.random.categorical(jax.random.key(0), filter_logits(logits, top_k, top_p))


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.7), (1.0, 3, 0.05)],
)
def test_filter_logits_sampling_distribution(temperature, top_k, top_p):
    logits = np.random.default_rng(3).normal(0.0, 1.5, 12).astype(np.float32)
    tiled = jnp.tile(jnp.asarray(logits) / temperature, (40_000, 1))
    samples = np.asarray(_filtered_sample(tiled, jnp.int32(top_k), jnp.float32(top_p)))
    _assert_frequencies(samples, _filtered_probs(logits, temperature, top_k, top_p))


def test_sampled_first_tokens_follow_filtered_model_softmax(models):
    hf, model = models
    ids, mask = _prompts()
    temperature, top_k, top_p = 0.8, 8, 0.6
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.key(7))
    out = _sample(model, ids, mask, **kwargs)
    logp = _hf_next_logprobs(hf, ids, mask)
    for b in range(len(LENGTHS)):
        expected = _filtered_probs(logp[b], temperature, top_k, top_p)
        assert 2 <= (expected > 0).sum() < top_k  # Both filters are active.
        _assert_frequencies(np.asarray(out.sequences[b, :, 0]), expected)
    again = _sample(model, ids, mask, **kwargs)
    np.testing.assert_array_equal(np.asarray(again.sequences), np.asarray(out.sequences))


# (early_stopping, length_penalty): EOS-finished and max-length-finished hypotheses.
BEAM_CASES = [(False, 1.0), (True, 1.0), (False, 2.0), ("never", 2.0), (True, 0.5)]


def test_beam_search_matches_hf_generate(models):
    hf, model = models
    ids, mask = _prompts()
    batch, beams = len(LENGTHS), 4
    common = dict(num_beams=beams, max_new_tokens=STEPS, eos_token_id=EOS, pad_token_id=PAD)
    results = {}
    for early_stopping, length_penalty in BEAM_CASES:
        case = dict(common, early_stopping=early_stopping, length_penalty=length_penalty)
        with torch.no_grad():
            ref = hf.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                do_sample=False,
                num_return_sequences=beams,
                repetition_penalty=1.0,
                return_dict_in_generate=True,
                output_scores=True,
                **case,
            )
        ref_seqs = ref.sequences.numpy()[:, ids.shape[1] :]
        width = ((0, 0), (0, STEPS - ref_seqs.shape[1]))
        ref_seqs = np.pad(ref_seqs, width, constant_values=PAD).reshape(batch, beams, STEPS)
        out = generate(model, ids, mask, method="beam", num_return_sequences=beams, **case)
        seqs = np.asarray(out.sequences)
        np.testing.assert_array_equal(seqs, ref_seqs, err_msg=str(case))
        np.testing.assert_allclose(
            np.asarray(out.scores), ref.sequences_scores.numpy().reshape(batch, beams), atol=1e-5
        )
        results[early_stopping, length_penalty] = seqs
    # The cases are not trivial: hypotheses end with EOS at several lengths, some run to
    # max_new_tokens, and early_stopping changes the answer.
    ends = {int(np.argmax(r == EOS)) for r in results[False, 1.0].reshape(-1, STEPS) if EOS in r}
    assert len(ends) >= 3 and (results[False, 2.0][..., -1] != PAD).any()
    assert not np.array_equal(results[True, 1.0], results[False, 1.0])
    top2 = generate(model, ids, mask, method="beam", num_return_sequences=2, **common)
    np.testing.assert_array_equal(np.asarray(top2.sequences), results[False, 1.0][:, :2])


def _check_trie_beams(
    hf, model, titles: list[list[int]], length_penalty: float, keep: np.ndarray | None = None
):
    """Constrained beam search over a left-padded batch vs exhaustive scoring of every
    title (with `keep` [B, S]: every kept title) under the unpadded prompt."""
    ids, mask = _prompts()
    trie = Trie.build(titles, EOS, **TRIE_PADDING)
    out = generate(model, ids, mask, method="beam", num_beams=TRIE_BEAMS,
                   num_return_sequences=TRIE_BEAMS, max_new_tokens=6,
                   length_penalty=length_penalty, pad_token_id=PAD, trie=trie, keep=keep)  # fmt: skip
    seqs, scores, found = map(np.asarray, out)
    for b, length in enumerate(LENGTHS):
        kept = np.ones(len(titles), bool) if keep is None else keep[b]
        allowed = np.unique(trie.canonical[kept])  # a title stays while one of its items is kept
        distinct = {tuple(titles[t]) for t in allowed}
        loglik = _hf_loglik(hf, ids[b, -length:], [[*t, EOS] for t in titles])
        exhaustive = loglik / (np.array([len(t) + 1.0 for t in titles]) ** length_penalty)
        valid = found[b] >= 0
        assert valid.sum() == min(TRIE_BEAMS, len(distinct))
        assert set(found[b, valid]) <= set(allowed)
        assert (scores[b, ~valid] == -np.inf).all() and not valid[valid.sum() :].any()
        for seq, title, score in zip(
            seqs[b, valid], found[b, valid], scores[b, valid], strict=True
        ):
            expected = [*titles[title], EOS]
            assert list(seq[: len(expected)]) == expected and (seq[len(expected) :] == PAD).all()
            assert trie.canonical[title] == title
            np.testing.assert_allclose(score, exhaustive[title], atol=1e-4)
        assert len({tuple(s) for s in seqs[b, valid]}) == valid.sum()  # Distinct items.
        assert (np.diff(scores[b, valid]) <= 1e-6).all()  # Best first.
        if len(distinct) <= TRIE_BEAMS:  # Beams cover the catalogue: exact top-K.
            best = allowed[np.argsort(-exhaustive[allowed])]
            np.testing.assert_allclose(scores[b, valid], exhaustive[best], atol=1e-4)
            assert set(found[b, valid]) == set(best)


_titles = st.lists(st.lists(st.sampled_from(list(ALPHABET)), min_size=1, max_size=5),
                   min_size=1, max_size=TRIE_BEAMS)  # fmt: skip


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(titles=_titles, length_penalty=st.sampled_from([0.0, 1.0, 2.0]))
def test_trie_beam_search_equals_exhaustive_scoring(models, titles, length_penalty):
    _check_trie_beams(*models, titles, length_penalty)


def test_trie_beam_search_large_catalogue_returns_valid_titles(models):
    rng = np.random.default_rng(5)
    titles = [list(rng.choice(list(ALPHABET), rng.integers(1, 6))) for _ in range(20)]
    titles += [titles[3], titles[7][:1]]  # A duplicate title and a prefix title.
    _check_trie_beams(*models, titles, 1.0)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(titles=_titles, seed=st.integers(0, 1000))
def test_trie_beam_search_with_keep_equals_exhaustive_scoring_of_the_kept_titles(
    models, titles, seed
):
    keep = np.random.default_rng(seed).random((len(LENGTHS), len(titles))) < 0.5
    keep[0] = True  # one prompt may produce every title, the others about half of them
    _check_trie_beams(*models, titles, 1.0, keep)


def test_trie_sampling_yields_titles(models):
    _, model = models
    ids, mask = _prompts()
    titles = [[6, 7], [6, 7, 8], [9], [10, 11, 12, 13], [6, 7]]
    trie = Trie.build(titles, EOS)
    assert trie.canonical.tolist() == [0, 1, 2, 3, 0] and trie.members(4).tolist() == [0, 4]
    out = generate(model, ids, mask, method="sample", num_return_sequences=64,
                   pad_token_id=PAD, trie=trie, rng=jax.random.key(0))  # fmt: skip
    assert out.sequences.shape == (3, 64, trie.depth)
    seqs, found = np.asarray(out.sequences), np.asarray(out.titles)
    for seq, title in zip(seqs.reshape(-1, trie.depth), found.reshape(-1), strict=True):
        expected = [*titles[title], EOS]
        assert list(seq[: len(expected)]) == expected and (seq[len(expected) :] == PAD).all()
    assert len(set(found.reshape(-1))) >= 3


def test_last_hidden_matches_hf(models):
    hf, model = models
    ids, mask = _prompts()
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0)),
            output_hidden_states=True,
        ).hidden_states[-1][:, -1]
    np.testing.assert_allclose(np.asarray(last_hidden(model, ids, mask)), ref.numpy(), atol=1e-5)


def test_bad_inputs_raise(models):
    _, model = models
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="contains EOS"):
        Trie.build([[6, EOS]], EOS)
    with pytest.raises(ValueError, match="empty"):
        Trie.build([[6], []], EOS)
    trie = Trie.build([[6, 7, 8]], EOS)
    with pytest.raises(ValueError, match="trie.depth"):
        generate(model, ids, mask, method="beam", num_beams=2, max_new_tokens=3, trie=trie)
    with pytest.raises(ValueError, match="keep"):
        generate(
            model, ids, mask, method="beam", num_beams=2, trie=trie, keep=np.ones((1, 1), bool)
        )
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, method="sample", max_new_tokens=3)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(model, ids, mask, method="beam", num_beams=2, num_return_sequences=3,
                 max_new_tokens=3)  # fmt: skip
    with pytest.raises(ValueError, match="method"):
        generate(model, ids, mask, method="nucleus", max_new_tokens=3)
