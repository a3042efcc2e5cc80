"""Multi-process runs (`eval.distributed`, `tools.launch`): 2 processes x 4 CPU devices on
127.0.0.1 against 1 process x 8 devices, a 2-process checkpoint resumed by 1 process."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from tiny import (
    REPO,
    TINY_HSTU,
    flat,
    random_hf_qwen,
    sft_args,
    sid_args,
    tiger_config,
    tiger_run_args,
    train_losses,
    write_tiny_ml100k,
)

from eval import distributed
from eval.errors import FlagError
from eval.training import read_records
from hstu import train
from tools import launch

OVERRIDES = {**TINY_HSTU, "max_steps": 5, "eval_every": 1}
MESH = "data:2,model:4"  # the item table's 32 rows split over 'model', across processes


def _launch(args, env=None):
    """`args` (a `python -m ...` command line) as 2 processes x 4 fake CPU devices."""
    cmd = [sys.executable, "-m", "tools.launch", "--num_processes=2", "--devices_per_process=4",
           "--", sys.executable, *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _launch_hstu(folder, out, env=None):
    args = ["-m", "hstu.train", "--dataset=ml-100k", f"--data_dir={folder}", "--preset=hstu-ml",
            f"--out={out}", f"--mesh={MESH}", "--shard_items",
            *(f"--{k}={v}" for k, v in OVERRIDES.items())]  # fmt: skip
    return _launch(args, env)


def _reads_half(output: str) -> None:
    """Each of the 2 processes read half the rows of every training batch (its devices')."""
    for process in (0, 1):
        found = re.search(rf"process {process} reads (\d+) of the (\d+) rows", output)
        assert found and 2 * int(found[1]) == int(found[2]), output[-3000:]


def _valid(out, metric="NDCG@10"):
    return [r[metric] for r in read_records(out) if r["split"] == "valid"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The uninterrupted 2-process run: (data folder, run folder)."""
    tmp = tmp_path_factory.mktemp("mp")
    folder = write_tiny_ml100k(tmp / "ml-100k", num_items=31)
    done = _launch_hstu(folder, tmp / "two", {"LLM4REC_CACHE": str(tmp / "cache")})
    assert done.returncode == 0, done.stdout[-3000:]
    _reads_half(done.stdout)
    return folder, tmp / "two"


def test_two_processes_of_four_devices_match_one_of_eight(two_processes, tmp_path):
    folder, two = two_processes
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    one = train.train("ml-100k", str(folder), "hstu-ml", OVERRIDES, str(tmp_path / "one"),
                      progress=False, mesh=MESH, shard_items=True)  # fmt: skip
    result = json.loads((two / "result.json").read_text())
    assert json.loads((two / "run.json").read_text())["info"]["processes"] == 2
    assert result["item_table_split"] and one["item_table_split"]  # ranked per shard
    assert train_losses(two) == pytest.approx(train_losses(tmp_path / "one"), abs=1e-5)
    assert len(train_losses(two)) == 5
    assert _valid(two) == pytest.approx(_valid(tmp_path / "one"), abs=1e-6)
    for protocol, metrics in one["test"].items():
        assert result["test"][protocol] == pytest.approx(metrics, abs=1e-6), protocol


RECGPT = dict(max_seq_len=8, embedding_dim=8, num_blocks=1, ffn_dim=16, batch_size=8,
              max_steps=4, eval_every=1, learning_rate=5e-3)  # fmt: skip


@pytest.mark.slow  # 90 s: every stage's and every recall cutoff's compilations, twice
def test_recgpt_two_processes_of_four_devices_match_one_of_eight(two_processes, tmp_path):
    """Every RecGPT stage (pre-training, prompt-tuning) with the item table and head split
    over 'model' across 2 processes: the losses, the ablation and the test metrics of one
    process with 8 devices (the split-table ranking itself is tested in `make test`:
    `test_recgpt_ranks_on_a_split_table_as_on_one_device`)."""
    folder, _ = two_processes
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    stages = dict(prompt_lengths=(1,), recall_shares=(0.9,), prompt_max_steps=3)
    args = ["-m", "hstu.train", "--dataset=ml-100k", f"--data_dir={folder}", "--preset=recgpt",
            f"--out={tmp_path / 'two'}", f"--mesh={MESH}", "--shard_items",
            "--prompt_lengths=1", "--recall_shares=0.9", "--prompt_max_steps=3",
            *(f"--{k}={v}" for k, v in RECGPT.items())]  # fmt: skip
    done = _launch(args, {"LLM4REC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stdout[-3000:]
    _reads_half(done.stdout)
    one = train.train("ml-100k", str(folder), "recgpt", RECGPT, str(tmp_path / "one"),
                      progress=False, mesh=MESH, shard_items=True, **stages)  # fmt: skip
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["item_table_split"] and one["item_table_split"]  # ranked per shard
    for stage, steps in (("pretrain", 4), ("prompt_k1", 3)):
        losses = train_losses(tmp_path / "two" / stage)
        assert len(losses) == steps, stage
        assert losses == pytest.approx(train_losses(tmp_path / "one" / stage), abs=1e-5), stage
    assert flat(two["ablation"]) == pytest.approx(flat(one["ablation"]), abs=1e-6)
    for protocol, metrics in one["test"].items():
        assert two["test"][protocol] == pytest.approx(metrics, abs=1e-6), protocol


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, tmp_path):
    folder, two = two_processes
    killed = _launch_hstu(folder, tmp_path / "run", {"LLM4REC_KILL_AT": "after:2"})
    assert killed.returncode == 128 + 9, killed.stdout[-3000:]  # SIGKILL, as a shell reports it
    assert not (tmp_path / "run" / "result.json").exists()
    resumed = train.train("ml-100k", str(folder), "hstu-ml", OVERRIDES, str(tmp_path / "run"),
                          progress=False)  # fmt: skip
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(two), abs=1e-5)
    uninterrupted = json.loads((two / "result.json").read_text())["test"]
    for protocol, metrics in uninterrupted.items():
        assert resumed["test"][protocol] == pytest.approx(metrics, abs=1e-6), protocol


def test_one_failing_process_stops_the_others_with_its_status():
    fail_second = (
        "import sys, time\nsys.exit(3) if '--process_id=1' in sys.argv else time.sleep(120)"
    )
    start = time.perf_counter()
    assert launch.launch([sys.executable, "-c", fail_second], num_processes=2) == 3
    assert time.perf_counter() - start < 60
    with pytest.raises(Exception, match="no command"):
        launch.launch([], num_processes=2)


def test_distributed_flags_and_meshes_are_checked():
    with pytest.raises(FlagError, match="--num_processes, --process_id"):
        distributed.initialize("127.0.0.1:1234", None, None)
    with pytest.raises(FlagError, match="--process_id=2: must be < --num_processes=2"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    assert distributed.initialize(None, None, None) is False  # one process: nothing joined
    assert distributed.parse_mesh("data:-1", ("data", "model")) == {"data": -1, "model": 1}
    with pytest.raises(FlagError, match="--mesh='rows:2'"):
        distributed.parse_mesh("rows:2", ("data", "model"))
    with pytest.raises(FlagError, match="needs 3 devices"):
        distributed.make_mesh({"data": 3, "model": 1}, jax.devices()[:2])
    with pytest.raises(FlagError, match="not divisible by 3"):
        distributed.make_mesh({"data": -1, "model": 3}, jax.devices()[:2])


def test_a_process_reads_the_rows_its_devices_hold():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from eval.data.examples import ArraySource, batches
    from eval.training import TrainState

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = distributed.make_mesh({"data": 4, "model": 2})
    sharding = NamedSharding(mesh, P(None, "data"))
    first = jax.devices()[:4]  # a process of 4 devices: 'data' rows 0 and 1 of 4
    np.testing.assert_array_equal(distributed.rows_of_devices(sharding, 8, 1, first), range(4))
    # Two micro-batches of 4 rows: the first half of each.
    np.testing.assert_array_equal(distributed.rows_of_devices(sharding, 8, 2, first), [0, 1, 4, 5])
    assert distributed.process_rows(mesh, ("data",), 8) is None  # one process: every row
    # The loader reads those rows of the same global batches.
    source = ArraySource({"x": np.arange(40)})
    held = np.array([0, 1, 4, 5])
    whole = batches(source, 8, seed=3, num_epochs=None, start_batch=2)
    part = batches(source, 8, seed=3, num_epochs=None, start_batch=2, rows=held)
    for _, w, p in zip(range(6), whole, part, strict=False):
        np.testing.assert_array_equal(p["x"], w["x"][held])
    # A process's rows become the global batch (here one process holds them all).
    state = TrainState(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), optax.sgd(0.1), mesh=mesh)
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    for acc in (1, 2):
        local = state.put_batch({"x": x}, acc, global_rows=8)["x"]
        np.testing.assert_array_equal(
            np.asarray(local), np.asarray(state.put_batch({"x": x}, acc)["x"])
        )
        assert local.sharding == state.put_batch({"x": x}, acc)["x"].sharding


def test_processes_loading_one_data_set_at_once_build_its_cache_once(tmp_path):
    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    code = f"from eval import data; print(data.load('ml-100k', {str(folder)!r}).num_items)"
    env = {**os.environ, "LLM4REC_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len({o[0] for o in outs}) == 1
    (entry,) = [p for p in (tmp_path / "cache" / "processed").iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == ["data.npz", "items.json", "manifest.json"]


def test_sharded_full_ranking_equals_the_unsharded_one():
    from eval import metrics
    from eval.data.dataset import Ragged
    from eval.sharded_ranking import ranks_and_top_k

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    rng = np.random.default_rng(0)
    num_items, batch, k = 63, 16, 10  # 64 table rows: 8 per shard
    table = rng.normal(size=(num_items + 1, 8)).astype(np.float32)
    queries = rng.normal(size=(batch, 8)).astype(np.float32)
    history = Ragged.from_rows([rng.choice(np.arange(1, 64), rng.integers(0, 12), replace=False)
                                for _ in range(batch)])  # fmt: skip
    targets = rng.integers(1, num_items + 1, size=batch)
    targets[0] = history[0][0] if len(history[0]) else targets[0]  # a seen target counts
    padded = np.zeros((batch, 12), np.int32)
    for i in range(batch):
        padded[i, : len(history[i])] = history[i]
    mesh = distributed.make_mesh({"data": 1, "model": 8})
    sharded_table = jax.device_put(table, jax.NamedSharding(mesh, jax.P("model", None)))
    ranks, top, _ = ranks_and_top_k(queries, sharded_table, targets, padded, k=k, mesh=mesh)
    scores = queries @ table.T
    mask = metrics.history_mask(history, num_items, rows=np.arange(batch))
    mask[np.arange(batch), targets] = False
    expected = metrics.target_ranks_jax(scores, targets, mask)
    np.testing.assert_array_equal(np.asarray(ranks), np.asarray(expected))
    ranked = np.where(mask, -np.inf, scores)
    ranked[:, 0] = -np.inf
    np.testing.assert_array_equal(
        np.asarray(top), np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    )


@pytest.mark.parametrize("preset,prompt_items", [("recgpt", 0), ("recgpt", 1), ("recgpt-code", 1)])
def test_recgpt_ranks_on_a_split_table_as_on_one_device(preset, prompt_items):
    """RecGPT's item table and softmax head split over 'model': full ranking by either,
    and two-stage recall (stage 1's top N, the generated item, the second query's ranks)
    per shard, give the one-device metrics."""
    from tiny import ring_split

    from hstu.trainer import make_trainer

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    ds, sp = ring_split(num_items=39)  # 40 rows: 10 per shard
    settings = dict(max_seq_len=8, embedding_dim=8, num_blocks=1, ffn_dim=16,
                    prompt_items=prompt_items, user_buckets=64)  # fmt: skip
    one = make_trainer(preset, ds.num_items, settings)
    model = one.state.model()
    model.head.bias[...] = jax.random.normal(jax.random.key(1), model.head.bias.shape)
    one.state.update_from(model)
    mesh = distributed.make_mesh({"data": 2, "model": 4})
    split = make_trainer(preset, ds.num_items, settings, mesh, shard_items=True)
    split.state.update_from(one.state.model())  # placed as the split state's own
    head = split.state.params["head"]
    assert split.sharded_table and head["kernel"].sharding.spec == jax.P(None, "model")
    assert head["bias"].sharding.spec == jax.P("model")
    for recall_n in (None, 4):
        for filtered in (True, False):
            one.recall_n = split.recall_n = recall_n
            expected = one.evaluate(ds, sp.test, "full", filtered, (1, 5, 10))
            assert split.evaluate(ds, sp.test, "full", filtered, (1, 5, 10)) == pytest.approx(
                expected, abs=1e-6
            ), (recall_n, filtered)


@pytest.mark.parametrize("tuning", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_sft_two_processes_of_four_devices_match_one_of_eight(tmp_path, tuning):
    """Mesh data:2,fsdp:2,tensor:2; LoRA on a saved HF checkpoint (placed on the mesh
    across processes) or full fine-tuning: the same losses, validation loss and exported
    weights (gathered across processes, written by process 0 only)."""
    from safetensors.numpy import load_file

    from llm_sft.lora import LoRAConfig
    from llm_sft.train import run

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    args, kwargs, config = sft_args(tmp_path, tmp_path / "two")
    export = "hf/model.safetensors"
    if tuning == "lora":
        hf = tmp_path / "qwen"
        random_hf_qwen(vocab_size=384, tie_word_embeddings=True).save_pretrained(hf)
        random_init = ("--init=", "--model_config=", "--nolora")
        args = [a for a in args if not a.startswith(random_init)] + [f"--hf_checkpoint={hf}"]
        lora = LoRAConfig(dropout=0.05)  # the flags' defaults
        kwargs = {**kwargs, "model_config": None, "hf_checkpoint": str(hf), "lora": lora}
        export = "adapter/adapter_model.safetensors"
    done = _launch(args)
    assert done.returncode == 0, done.stdout[-3000:]
    _reads_half(done.stdout)
    one = run(out=str(tmp_path / "one"), train=config, **kwargs)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), abs=1e-5)
    assert len(train_losses(tmp_path / "two")) == 6
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6)
    weights = [load_file(tmp_path / d / export) for d in ("two", "one")]
    assert weights[0].keys() == weights[1].keys()
    for name, array in weights[1].items():
        np.testing.assert_allclose(weights[0][name], array, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_sid_llm_two_processes_of_four_devices_match_one_of_eight(tmp_path):
    """The semantic-ID LLM's two stages (the same command line): the same losses and
    beam-search metrics."""
    args, _ = sid_args(tmp_path, tmp_path / "two")
    done = _launch(args)
    assert done.returncode == 0, done.stdout[-3000:]
    _reads_half(done.stdout)
    one_args = [a.replace(str(tmp_path / "two"), str(tmp_path / "one")) for a in args]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run([sys.executable, *one_args], cwd=REPO, env=env, check=True, timeout=600,
                   capture_output=True)  # fmt: skip
    one, two = (json.loads((tmp_path / r / "result.json").read_text()) for r in ("one", "two"))
    for stage in ("stage1", "stage2"):
        losses = [train_losses(tmp_path / run_ / stage) for run_ in ("two", "one")]
        assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0], stage
    assert two["sequential"] == pytest.approx(one["sequential"], abs=1e-9)
    assert two["greedy"] == one["greedy"]


def test_tiger_two_processes_of_four_devices_match_one_of_eight(tmp_path):
    """Data-parallel TIGER: the same losses; the beam-search evaluation, its batches split
    over the processes and gathered, gives the same metrics."""
    from rqvae import tiger_train

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    folder, index, flags, args = tiger_run_args(tmp_path, tmp_path / "two", max_steps=5,
                                                eval_every=1)  # fmt: skip
    done = _launch(args)
    assert done.returncode == 0, done.stdout[-3000:]
    _reads_half(done.stdout)
    config = dataclasses.replace(tiger_config(flags), max_steps=5, eval_every=1)
    one = tiger_train.run("ml-100k", str(folder), str(index), str(tmp_path / "one"), config,
                          mesh="data:8", progress=False)  # fmt: skip
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert json.loads((tmp_path / "two" / "run.json").read_text())["info"]["processes"] == 2
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), abs=1e-5)
    assert len(train_losses(tmp_path / "two")) == 5
    for split in ("valid", "test"):
        assert two[split] == pytest.approx(one[split], abs=1e-9), split
    assert _valid(tmp_path / "two", "HR@10") == _valid(tmp_path / "one", "HR@10")


def test_the_split_item_table_is_never_gathered_by_the_train_step():
    """Inputs, targets and sampled negatives looked up in a row-split table: each device
    gathers its own rows and an all-reduce sums the looked-up rows; no collective carries
    the table (the data-parallel gradient all-reduce carries one shard)."""
    import re

    from hstu.trainer import make_trainer

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    num_items, dim, rows = 255, 16, 8
    mesh = distributed.make_mesh({"data": 2, "model": 4})
    tr = make_trainer("hstu-amazon", num_items, {**TINY_HSTU, "embedding_dim": dim,
                      "attention_dim": dim, "linear_dim": dim, "batch_size": rows}, mesh, True)  # fmt: skip
    rng = np.random.default_rng(0)
    batch = {"users": np.arange(rows, dtype=np.int32),
             "ids": rng.integers(1, num_items + 1, (rows, 12)).astype(np.int32),
             "timestamps": np.zeros((rows, 12), np.int64), "lengths": np.full(rows, 12, np.int32)}  # fmt: skip
    hlo = tr.state.lower_train_step(tr.loss, batch, jax.random.key(0)).compile().as_text()
    ops = r" (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
    collectives = [(line.split(" = ", 1)[1][: m.start()], m[1]) for line in hlo.splitlines()
                   if " = " in line and (m := re.search(ops, line.split(" = ", 1)[1]))]  # fmt: skip
    shapes = [
        shape for outputs, _ in collectives for shape in re.findall(r"\w+\[[\d,]*\]", outputs)
    ]
    assert {op for _, op in collectives} == {"all-reduce"}, collectives
    assert f"f32[{num_items + 1},{dim}]" not in shapes  # the whole table never moves
    assert f"f32[{(num_items + 1) // 4},{dim}]" in shapes  # its shard's gradient, over 'data'
    table = tr.state.params["item_emb"]["embedding"]
    assert table.sharding.spec == jax.P("model", None)


def test_rqvae_two_processes_of_four_devices_match_one_of_eight(tmp_path):
    """Data-parallel RQ-VAE: the same losses, evaluations (the catalogue's encodings split
    over the processes and gathered) and semantic IDs; only process 0 writes them."""
    from rqvae import train as rqvae_train

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(70, 8)).astype(np.float32))
    flags = {"max_steps": 5, "eval_every": 1, "batch_size": 16, "num_levels": 2,
             "codebook_size": 16, "code_dim": 4, "hidden_dims": "16"}  # fmt: skip
    done = _launch(["-m", "rqvae.train", f"--embeddings={tmp_path / 'x.npy'}",
                    f"--out={tmp_path / 'two'}", "--dedup=reassign",
                    *(f"--{k}={v}" for k, v in flags.items())])  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    _reads_half(done.stdout)
    model = rqvae_train.RQVAEConfig(num_levels=2, codebook_size=16, code_dim=4, hidden_dims=(16,))
    config = rqvae_train.TrainConfig(model=model, max_steps=5, eval_every=1, batch_size=16)
    one = rqvae_train.train_run(str(tmp_path / "x.npy"), str(tmp_path / "one"), config,
                                "reassign", progress=False, mesh="data:8")  # fmt: skip
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert json.loads((tmp_path / "two" / "run.json").read_text())["info"]["processes"] == 2
    assert len(train_losses(tmp_path / "two")) == 5
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), abs=1e-5)
    assert two.keys() == one.keys()
    for key, value in one.items():
        assert np.asarray(two[key]) == pytest.approx(np.asarray(value), rel=1e-5), key
    assert _valid(tmp_path / "two", "recon_loss") == pytest.approx(
        _valid(tmp_path / "one", "recon_loss"), rel=1e-5
    )
    for name in ("semantic_ids.json", "semantic_ids_reassign.json"):
        index = json.loads((tmp_path / "two" / name).read_text())
        assert index == json.loads((tmp_path / "one" / name).read_text()), name
