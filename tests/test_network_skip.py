"""A network the plugin names in networks_to_skip takes no optimizer step: its weights and its optimizer
state stay bit for bit as they were, and the decision comes from the whole global batch, the same on
every rank (pipeline/plugin.py, step_totals). Real runs: 2 ranks, 2 micro-batches each, ZeRO-2.

The linear test plugin decides from the mean pixel of the step's global batch (a statistic the test
computes itself from the shards); the threshold is placed so that a rank deciding from its own
micro-batches alone would decide otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_helpers import build_small_shards, launch, metrics, write_config

from pipeline.commands.plot import panels
from pipeline.data.stream import StreamLayout, epoch_order
from shards.read.random_access import SplitDataset
from shards.read.reader import open_split

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

RANKS, MICRO_STEPS, BATCH, SEED = 2, 2, 2, 7
EMA_DECAY = 0.75


def rank_means(shards: Path, step: int) -> list[float]:
    """Each rank's mean pixel over its micro-batches of optimizer step `step`, as the trainer reads them."""
    split = open_split(shards)
    layout = StreamLayout(tuple(s["count"] for s in split.shards), SEED, 8, world_size=RANKS, batch_size=BATCH)
    order, dataset = list(epoch_order(layout, 0)), SplitDataset(split)
    means = []
    for rank in range(RANKS):
        images = []
        for micro_step in range(step * MICRO_STEPS, (step + 1) * MICRO_STEPS):
            start = micro_step * RANKS * BATCH + rank * BATCH
            images += [dataset[i][0] for i in order[start : start + BATCH]]
        means.append(float(torch.stack(images).double().mean()))
    return means


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def network_tensors(folder: Path, network: str) -> dict[str, torch.Tensor]:
    """The network's weights, and every rank's optimizer slices of it (master and state)."""
    tensors = {f"weights/{k}": v for k, v in load_file(str(folder / f"{network}.safetensors")).items()}
    for path in sorted((folder / "optimizer").glob("rank-*.safetensors")):
        for key, value in load_file(str(path)).items():
            if key.split("/", 1)[1].startswith(f"{network}."):
                tensors[f"{path.stem}/{key}"] = value
    return tensors


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_a_skipped_network_keeps_weights_and_optimizer_state_bit_for_bit(tmp_path: Path, optimizer: str) -> None:
    shards = build_small_shards(tmp_path / "data", images=40, size=8)
    own = rank_means(shards, 1)
    global_mean = sum(own) / RANKS  # equal image counts on both ranks
    lower = min(own)
    assert lower < global_mean, own  # the ranks' own means differ: the threshold goes between them
    threshold = (lower + global_mean) / 2  # the global batch is above it; the lower rank's own images are not
    skips = [
        {"step": 0, "network": "encoder", "above": -2.0},  # always: the encoder never stepped before step 2
        {"step": 1, "network": "decoder", "above": threshold},
        {"step": 2, "network": "encoder", "above": -2.0},  # always: its EMA, away from its weights by then, stays
    ]
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        shards,
        run,
        model={"hidden": 4, "skips": skips},
        max_steps=3,
        seed=SEED,
        checkpoint={"every": 1, "keep_last": 3},
        # weight decay: a zero gradient alone would still shrink the weights
        optimizer={"name": optimizer, "lr": 0.01, "weight_decay": 0.1},
        ema={"decay": EMA_DECAY, "start_step": 1},  # every network: the linear plugin names no ema_networks
    )
    if optimizer == "rmsprop":  # and through a resume from the checkpoint where the encoder has no state yet
        first = launch(config, "max_steps=1")
        assert first.returncode == 0, first.stderr[-3000:]
        partition = load_file(str(checkpoint(run, 1) / "optimizer" / "rank-00000.safetensors"))
        assert "square_avg/decoder.weight" in partition and "square_avg/encoder.weight" not in partition
    result = launch(config)
    assert result.returncode == 0, result.stderr[-3000:]

    # the run folder records the optimizer each network really got
    recorded = yaml.safe_load((run / "config.yaml").read_text())["optimizer"]
    each = {"lr": 0.01, "weight_decay": 0.1}
    assert recorded == {"name": optimizer, "encoder": each, "decoder": each}

    state = json.loads((checkpoint(run, 3) / "trainer_state.json").read_text())
    decisions = [rank["plugin"]["decisions"] for rank in state["ranks"]]
    assert decisions[0] == decisions[1], "the ranks decided differently"
    assert [(d["step"], d["skip"]) for d in decisions[0]] == [(0, ["encoder"]), (1, ["decoder"]), (2, ["encoder"])]
    totals = decisions[0][1]["totals"]
    assert totals["count"] == RANKS * MICRO_STEPS * BATCH * 64  # every image of the global batch, 8x8 pixels
    assert totals["pixels"] / totals["count"] == pytest.approx(global_mean, rel=1e-9, abs=1e-12)

    steps = {step: checkpoint(run, step) for step in (1, 2, 3)}
    encoder = {step: network_tensors(folder, "encoder") for step, folder in steps.items()}
    decoder = {step: network_tensors(folder, "decoder") for step, folder in steps.items()}
    assert identical(decoder[1], decoder[2]), "the decoder moved in the step it sat out"
    assert not any(torch.equal(decoder[2][k], decoder[3][k]) for k in decoder[2] if "weights/" in k)
    assert not any(torch.equal(encoder[1][k], encoder[2][k]) for k in encoder[1] if "weights/" in k)
    # the encoder sat out step 1 (the first): it holds its initial weights (the same on every rank, from
    # the seed) as masters, and no optimizer state
    assert not [key for key in encoder[1] if key.split("/")[1] not in ("weight", "bias", "master")]
    masters = torch.cat([encoder[1][k].flatten() for k in sorted(encoder[1]) if "/master/encoder.weight" in k])
    torch.testing.assert_close(masters, encoder[1]["weights/weight"].flatten(), rtol=0, atol=0)
    assert identical(encoder[2], encoder[3]), "the encoder moved in the step it sat out"
    assert_ema_follows_the_steps_taken(steps, skipped={2: {"decoder"}, 3: {"encoder"}})
    ran = [(record["updated/encoder"], record["updated/decoder"]) for record in metrics(run)]
    assert ran == [(0, 1), (1, 0), (0, 1)]  # metrics.jsonl, a record a step: 0 for the step a network sat out
    drawn = panels(metrics(run))  # what `pipeline plot` draws: a panel a group, a curve a network
    for panel in ("grad_norm", "updated", "lr"):
        assert sorted(drawn[panel]) == ["decoder", "encoder"], panel
    assert_logged_gradient_norms(run, shards, steps)


def test_gradient_norms_without_partitions_count_each_ranks_whole_copy_once(tmp_path: Path) -> None:
    """ZeRO-0: every rank holds the whole gradient, where ZeRO-2 holds a slice (the test above)."""
    shards = build_small_shards(tmp_path / "data", images=40, size=8)
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml", shards, run, max_steps=2, seed=SEED, checkpoint={"every": 1}, deepspeed={"zero_stage": 0}
    )
    result = launch(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_logged_gradient_norms(run, shards, {step: checkpoint(run, step) for step in (1, 2)})


def assert_logged_gradient_norms(run: Path, shards: Path, steps: dict[int, Path]) -> None:
    """metrics.jsonl's grad_norm/<network>, computed here: the gradient of the linear plugin's loss over the
    step's whole global batch (both ranks' micro-batches, read in the trainer's order) at the previous
    checkpoint's weights."""
    records = {record["step"]: record for record in metrics(run)}
    split = open_split(shards)
    layout = StreamLayout(tuple(s["count"] for s in split.shards), SEED, 8, world_size=RANKS, batch_size=BATCH)
    order, dataset = list(epoch_order(layout, 0)), SplitDataset(split)
    global_batch = RANKS * MICRO_STEPS * BATCH
    for step in sorted(steps)[1:]:
        images = torch.stack([dataset[i][0] for i in order[(step - 1) * global_batch : step * global_batch]])
        networks = {"encoder": torch.nn.Linear(64, 4), "decoder": torch.nn.Linear(4, 64)}
        for name, network in networks.items():
            network.load_state_dict(load_file(str(steps[step - 1] / f"{name}.safetensors")))
        flat = images.flatten(1).double()
        loss = (networks["decoder"].double()(networks["encoder"].double()(flat)) - flat).pow(2).mean()
        for name, network in networks.items():
            gradients = torch.autograd.grad(loss, list(network.parameters()), retain_graph=True)
            norm = torch.cat([gradient.flatten() for gradient in gradients]).norm().item()
            assert records[step][f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-4), (step, name)


def assert_ema_follows_the_steps_taken(steps: dict[int, Path], skipped: dict[int, set[str]]) -> None:
    """The EMA saved with each checkpoint, computed here from the raw weights of every checkpoint: it equals
    the weights up to ema.start_step (1), then moves (1 - decay) of the way toward them after each step its
    network took, and not at all after one it sat out (through the rmsprop run's resume at step 1 too)."""
    average = None
    for step, folder in sorted(steps.items()):
        for network in ("encoder", "decoder"):
            weights = load_file(str(folder / f"{network}.safetensors"))
            saved = load_file(str(folder / f"{network}.ema.safetensors"))
            if average is None or network not in average:
                average = {**(average or {}), network: {k: v.double() for k, v in weights.items()}}
            elif network not in skipped.get(step, set()):
                average[network] = {
                    k: e + (1 - EMA_DECAY) * (weights[k].double() - e) for k, e in average[network].items()
                }
            assert saved.keys() == weights.keys() and all(t.dtype == torch.float32 for t in saved.values())
            for key, value in saved.items():
                torch.testing.assert_close(value.double(), average[network][key], rtol=1e-6, atol=1e-7)
        if step - 1 in steps:
            for network in skipped.get(step, ()):
                before = load_file(str(steps[step - 1] / f"{network}.ema.safetensors"))
                after = load_file(str(folder / f"{network}.ema.safetensors"))
                assert all(torch.equal(before[k], after[k]) for k in after), f"{network}'s EMA moved in a skipped step"
                weights = load_file(str(folder / f"{network}.safetensors"))
                if step == max(steps):  # by then the average trails the weights: moving toward them would show
                    assert not torch.equal(after["weight"], weights["weight"])


def authors_equilibrium(real_cost: float, fake_cost: float, target: float, margin: float) -> set[str]:
    """model/aegan.py, GradientDescent.train_epoch: the discriminator sits out when either of its costs is
    below target - margin, the decoder when either is above target + margin, and neither when both would."""
    train_dis = not (real_cost < target - margin or fake_cost < target - margin)
    train_dec = not (real_cost > target + margin or fake_cost > target + margin)
    if not (train_dis or train_dec):
        train_dis = train_dec = True
    return {name for name, trains in (("discriminator", train_dis), ("decoder", train_dec)) if not trains}


def test_the_vaegans_equilibrium_is_one_decision_from_the_global_batch(tmp_path: Path) -> None:
    """The VAE-GAN's own equilibrium (not the linear plugin's rule) on 2 ranks x 2 micro-batches, ZeRO-2, a
    margin narrow enough that the decision changes from step to step: every step, the networks that took
    no update (metrics.jsonl's updated/*) are those the authors' rule picks from the step's costs over the
    whole global batch (the logged real_cost and fake_cost, means over every rank's micro-batches), and
    every rank counted the same steps sat out."""
    from trainer_helpers import run_small_vaegan

    target, margin = 0.69, 0.02
    model = {"latent_size": 8, "fc_size": 32, "equilibrium": True, "equilibrium_target": target}
    model["equilibrium_margin"] = margin
    run_small_vaegan(tmp_path, model, 2, max_steps=8, log_every=1, checkpoint={"every": 8}, seed=SEED)
    records = metrics(tmp_path / "run")
    assert [record["step"] for record in records] == list(range(1, 9))
    seen = set()
    for record in records:
        real, fake = record["real_cost"], record["fake_cost"]
        near = [abs(cost - edge) for cost in (real, fake) for edge in (target - margin, target + margin)]
        assert min(near) > 1e-6, "a cost on the rule's edge: float sums over ranks could decide either way"
        expected = authors_equilibrium(real, fake, target, margin)
        sat_out = {name for name in ("discriminator", "decoder") if record[f"updated/{name}"] == 0}
        assert sat_out == expected, (record["step"], real, fake)
        seen.add(frozenset(expected))
    assert len(seen) > 1, f"the rule decided the same every step ({seen}): the test would not tell"
    state = json.loads((checkpoint(tmp_path / "run", 8) / "trainer_state.json").read_text())
    skipped = [rank["plugin"]["skipped"] for rank in state["ranks"]]
    assert skipped[0] == skipped[1]
    assert skipped[0] == {
        name: sum(record[f"updated/{name}"] == 0 for record in records) for name in ("discriminator", "decoder")
    }
