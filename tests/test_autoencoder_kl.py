"""The `autoencoder-kl` plugin against its references, written here from their sources, not from our code:
diffusers' AutoencoderKL for the networks' names and shapes (src/diffusers/models/autoencoders/vae.py,
unets/unet_2d_blocks.py, resnet.py), and latent-diffusion's LPIPSWithDiscriminator for the loss
(ldm/modules/losses/contperceptual.py, taming/modules/losses/vqperceptual.py), computed in float64 and
differentiated per network as the references' two optimizer steps do (the other network frozen)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PluginError
from pipeline.plugin import ImageInfo
from pipeline.plugins.autoencoder_kl import AutoencoderKL

TINY = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "disc_channels": 4,
    "disc_layers": 2,
}


def diffusers_shapes(in_channels, widths, layers, latent, attention=True) -> dict[str, tuple[int, ...]]:
    """AutoencoderKL.state_dict()'s keys and shapes, from diffusers' constructors (Encoder: a
    DownEncoderBlock2D of `layers` ResNets per width, a Downsample2D conv after each but the last; Decoder:
    UpDecoderBlock2D of layers + 1 ResNets over the reversed widths, an Upsample2D conv after each but the
    last; a conv_shortcut where a ResNet changes width; the mid-block's ResNet, attention, ResNet)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(f"{name}.resnets.0", c, c)
        if attention:
            norm(f"{name}.attentions.0.group_norm", c)
            for part in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes[f"{name}.attentions.0.{part}.weight"], shapes[f"{name}.attentions.0.{part}.bias"] = (c, c), (c,)
        resnet(f"{name}.resnets.1", c, c)

    conv("encoder.conv_in", in_channels, widths[0], 3)
    out = widths[0]
    for i, width in enumerate(widths):
        previous, out = out, width
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", previous if j == 0 else out, out)
        if i != len(widths) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", out, out, 3)
    mid("encoder.mid_block", widths[-1])
    norm("encoder.conv_norm_out", widths[-1]), conv("encoder.conv_out", widths[-1], 2 * latent, 3)
    conv("decoder.conv_in", latent, widths[-1], 3)
    mid("decoder.mid_block", widths[-1])
    reversed_widths, out = widths[::-1], widths[-1]
    for i, width in enumerate(reversed_widths):
        previous, out = out, width
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", previous if j == 0 else out, out)
        if i != len(widths) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", out, out, 3)
    norm("decoder.conv_norm_out", widths[0]), conv("decoder.conv_out", widths[0], in_channels, 3)
    conv("quant_conv", 2 * latent, 2 * latent, 1), conv("post_quant_conv", latent, latent, 1)
    return shapes


def autoencoder_shapes(plugin: AutoencoderKL) -> dict[str, tuple[int, ...]]:
    networks = plugin.build_networks()
    state = {**networks["encoder"].state_dict(), **networks["decoder"].state_dict()}
    return {key: tuple(value.shape) for key, value in state.items()}


def test_the_networks_are_diffusers_autoencoderkl_key_for_key() -> None:
    tiny = AutoencoderKL(TINY, ImageInfo(16, 3))
    assert autoencoder_shapes(tiny) == diffusers_shapes(3, [8, 16], 1, 4)
    no_attention = AutoencoderKL({**TINY, "mid_block_add_attention": False, "latent_channels": 2}, ImageInfo(16, 1))
    assert autoencoder_shapes(no_attention) == diffusers_shapes(1, [8, 16], 1, 2, attention=False)
    # Stable Diffusion's kl-f8, the defaults: 248 tensors, 83,653,863 parameters (its published size)
    shapes = diffusers_shapes(3, [128, 256, 512, 512], 2, 4)
    assert len(shapes) == 248 and sum(torch.Size(shape).numel() for shape in shapes.values()) == 83_653_863
    assert autoencoder_shapes(AutoencoderKL({}, ImageInfo(64, 3))) == shapes


def test_the_discriminator_is_taming_nlayer_discriminator() -> None:
    """Keys main.N as taming's (LeakyReLU at the odd places between), a 30 x 30 patch map for 256 px."""
    discriminator = AutoencoderKL({}, ImageInfo(256, 3)).build_networks()["discriminator"]
    shapes = {key: tuple(value.shape) for key, value in discriminator.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.0.bias"] == (64,)
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.8.weight"] == (512, 256, 4, 4) and shapes["main.9.running_var"] == (512,)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and shapes["main.11.bias"] == (1,)
    assert sum(value.numel() for value in discriminator.parameters()) == 2_765_633
    assert discriminator(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def reference_gradients(networks, images, noise, options: dict, step: int, perceptual=None) -> dict[str, torch.Tensor]:
    """contperceptual.py's two losses, float64, each network's gradient of its own (the G step with the
    discriminator frozen, the D step on the reconstruction detached)."""
    encoder, decoder, discriminator = networks["encoder"], networks["decoder"], networks["discriminator"]
    moments = encoder.quant_conv(encoder.encoder(images))
    mean, logvar_z = torch.chunk(moments, 2, dim=1)
    logvar_z = torch.clamp(logvar_z, -30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar_z) * noise
    reconstruction = decoder.decoder(decoder.post_quant_conv(z))
    rec_loss = torch.abs(images - reconstruction)
    if options.get("perceptual") == "discriminator":

        def hidden(x):
            return discriminator.main[:-1](x)

        p_loss = (hidden(reconstruction) - hidden(images).detach()).pow(2).mean(dim=(1, 2, 3), keepdim=True)
        rec_loss = rec_loss + options.get("perceptual_weight", 1.0) * p_loss
    if options.get("perceptual") == "lpips":
        rec_loss = rec_loss + options["perceptual_weight"] * perceptual["lpips"](images, reconstruction)
    logvar = torch.tensor(0.0, dtype=torch.float64)
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = 0.5 * torch.sum(torch.pow(mean, 2) + torch.exp(logvar_z) - 1.0 - logvar_z, dim=[1, 2, 3])
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    logits_fake = discriminator(reconstruction)
    g_loss = -torch.mean(logits_fake)
    last_layer = decoder.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach()
    d_weight = d_weight * options["disc_weight"]
    disc_factor = 1.0 if step >= options["disc_start"] else 0.0
    loss = nll_loss + options["kl_weight"] * kl_loss + d_weight * disc_factor * g_loss
    autoencoder_parameters = [*encoder.parameters(), *decoder.parameters()]
    autoencoder_gradients = torch.autograd.grad(loss, autoencoder_parameters, retain_graph=True)
    logits_real = discriminator(images.detach())
    logits_fake = discriminator(reconstruction.detach())
    if options["disc_loss"] == "hinge":
        d_loss = 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))
    else:
        d_loss = 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))
    d_loss = disc_factor * d_loss
    discriminator_gradients = torch.autograd.grad(d_loss, list(discriminator.parameters()), allow_unused=True)
    names = [f"encoder.{n}" for n, _ in encoder.named_parameters()] + [
        f"decoder.{n}" for n, _ in decoder.named_parameters()
    ]
    found = dict(zip(names, autoencoder_gradients, strict=True))
    found.update(
        {
            f"discriminator.{n}": torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(discriminator.named_parameters(), discriminator_gradients, strict=True)
        }
    )
    return found


@pytest.mark.parametrize(
    ("disc_loss", "perceptual", "step"),
    [("hinge", "none", 5), ("vanilla", "none", 5), ("hinge", "discriminator", 5), ("hinge", "none", 2)],
)
def test_each_network_gets_the_gradient_of_its_own_reference_loss(disc_loss: str, perceptual: str, step: int) -> None:
    """Step 5 with disc_start 3: every term; step 2: before the discriminator starts (its gradient is zero
    and it sits out the step; the autoencoder's loss has no GAN term)."""
    options = {
        **TINY,
        "disc_start": 3,
        "disc_weight": 0.5,
        "kl_weight": 0.01,
        "disc_loss": disc_loss,
        "perceptual": perceptual,
        "disc_layers": 2,
    }
    plugin = AutoencoderKL(options, ImageInfo(16, 3))
    torch.manual_seed(0)
    networks = torch.nn.ModuleDict(plugin.build_networks()).double()
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    torch.manual_seed(1)
    output = plugin.training_step(networks, images, torch.full((3,), -1), step)
    output.loss.backward()
    ours = {name: parameter.grad for name, parameter in networks.named_parameters()}
    torch.manual_seed(1)
    noise = torch.randn(3, 4, 8, 8, dtype=torch.float64)  # the posterior's draw, as the plugin's randn_like
    expected = reference_gradients(networks, images, noise, options, step)
    assert ours.keys() == expected.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    skipped = plugin.networks_to_skip({}, step)
    assert skipped == (set() if step >= 3 else {"discriminator"})
    assert ("d_weight" in output.metrics) == (step >= 3)  # the GAN's metrics from the step it starts


def test_bad_options_are_one_line() -> None:
    with pytest.raises(PluginError, match="do not divide by the 2x downsampling"):
        AutoencoderKL(TINY, ImageInfo(15, 3))
    with pytest.raises(PluginError, match=r"too small for disc_layers 3 \(at least 24 px"):
        AutoencoderKL({**TINY, "disc_layers": 3}, ImageInfo(16, 3))
    with pytest.raises(PluginError, match="multiple of norm_num_groups"):
        AutoencoderKL({**TINY, "block_out_channels": [8, 18]}, ImageInfo(16, 3))
    with pytest.raises(PluginError, match=r"model\.disc_loss"):
        AutoencoderKL({**TINY, "disc_loss": "wasserstein"}, ImageInfo(16, 3))


# LPIPS v0.1 (VGG16), from Zhang et al. 2018 and the `lpips` package's constants: inputs in [-1, 1] shifted
# by (-0.030, -0.088, -0.188) and scaled by (0.458, 0.448, 0.450); torchvision's vgg16().features, tapped
# after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices 3, 8, 15, 22, 29); each tap divided by its
# channel norm + 1e-10; squared differences through a 1x1 convolution without bias; mean over positions; sum.
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)


def random_lpips_sources(generator: torch.Generator) -> tuple[dict, dict]:
    """A torchvision-format VGG16 state dict and the lpips package's vgg.pth, random (the real ones cannot
    be downloaded here): what `pipeline lpips-weights` reads."""
    vgg, channels, index = {}, 3, 0
    for width in VGG16:
        if width == "M":
            index += 1
            continue
        vgg[f"features.{index}.weight"] = (
            torch.randn(width, channels, 3, 3, generator=generator) * (2 / (9 * channels)) ** 0.5
        )
        vgg[f"features.{index}.bias"] = torch.randn(width, generator=generator) * 0.1
        channels, index = width, index + 2
    lins = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator)
        for k, c in enumerate([64, 128, 256, 512, 512])
    }
    return lins, vgg


def reference_lpips(x: torch.Tensor, y: torch.Tensor, lins: dict, vgg: dict) -> torch.Tensor:
    # the package's ScalingLayer holds them as torch.Tensor([...]): float32
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float32).to(x.dtype)[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float32).to(x.dtype)[None, :, None, None]

    def taps(image):
        found, index, h = [], 0, (image - shift) / scale
        for width in VGG16:
            if width == "M":
                h, index = F.max_pool2d(h, 2, 2), index + 1
                continue
            h = F.relu(
                F.conv2d(
                    h, vgg[f"features.{index}.weight"].to(x.dtype), vgg[f"features.{index}.bias"].to(x.dtype), padding=1
                )
            )
            if index + 1 in TAPS:
                found.append(h)
            index += 2
        return found

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        total = total + F.conv2d((a - b) ** 2, lins[f"lin{k}.model.1.weight"].to(x.dtype)).mean([2, 3], keepdim=True)
    return total


def lpips_file(tmp_path, generator) -> tuple:
    import pickle  # noqa: F401  (torch.save's format; read back with weights_only=True)

    from pipeline.cli import main

    lins, vgg = random_lpips_sources(generator)
    torch.save(lins, tmp_path / "vgg.pth")
    torch.save(vgg, tmp_path / "vgg16.pth")
    out = tmp_path / "lpips.safetensors"
    assert (
        main(["lpips-weights", str(out), "--lpips", str(tmp_path / "vgg.pth"), "--vgg", str(tmp_path / "vgg16.pth")])
        == 0
    )
    return out, lins, vgg


def test_lpips_from_the_converted_file_is_the_papers(tmp_path) -> None:
    from safetensors.torch import load_file

    from pipeline.plugins.lpips import LPIPS

    out, lins, vgg = lpips_file(tmp_path, torch.Generator().manual_seed(0))
    lpips = LPIPS()
    lpips.load_state_dict(load_file(str(out)), strict=True)
    x, y = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (1, 2))
    with torch.no_grad():
        torch.testing.assert_close(
            lpips.double()(x.double(), y.double()),
            reference_lpips(x.double(), y.double(), lins, vgg),
            rtol=1e-10,
            atol=1e-12,
        )
        assert lpips(x.double(), x.double()).abs().max() == 0
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.training


def test_with_lpips_each_network_gets_the_gradient_of_its_own_reference_loss(tmp_path) -> None:
    from safetensors.torch import load_file

    out, lins, vgg = lpips_file(tmp_path, torch.Generator().manual_seed(4))
    options = {**TINY, "disc_start": 0, "disc_weight": 0.5, "kl_weight": 0.01, "disc_loss": "hinge", "disc_layers": 2,
               "perceptual": "lpips", "lpips_weights": str(out), "perceptual_weight": 0.7}  # fmt: skip
    plugin = AutoencoderKL(options, ImageInfo(16, 3))
    assert plugin.auxiliary_files() == {"lpips": out}
    frozen = plugin.build_auxiliary({"lpips": load_file(str(out))})["lpips"].double()
    torch.manual_seed(0)
    networks = torch.nn.ModuleDict(plugin.build_networks()).double()
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    torch.manual_seed(1)
    plugin.training_step(networks, images, torch.full((3,), -1), 2).loss.backward()
    ours = {name: parameter.grad for name, parameter in networks.named_parameters()}
    torch.manual_seed(1)
    noise = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    perceptual = {"lpips": lambda x, y: reference_lpips(x, y, lins, vgg)}
    expected = reference_gradients(networks, images, noise, options, 2, perceptual)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert not any(p.grad is not None for p in frozen.parameters())  # never trained


class RunsCodeWhenUnpickled:
    """What a hostile .pth holds: unpickling it calls os.system (torch.load without weights_only would)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_lpips_weights_refuses_a_pickle_that_runs_code(tmp_path, capsys) -> None:
    """A forged vgg.pth whose unpickling would run a shell command: refused in one line, the command never
    run, nothing written (torch.load(weights_only=True) unpickles tensors only)."""
    from pipeline.cli import main

    marker = tmp_path / "code-ran"
    lins, vgg = random_lpips_sources(torch.Generator().manual_seed(0))
    torch.save({**lins, "payload": RunsCodeWhenUnpickled(marker)}, tmp_path / "vgg.pth")
    torch.save(vgg, tmp_path / "vgg16.pth")
    out = tmp_path / "lpips.safetensors"
    code = main(["lpips-weights", str(out), "--lpips", str(tmp_path / "vgg.pth"), "--vgg", str(tmp_path / "vgg16.pth")])
    error = capsys.readouterr().err
    assert code == 2 and not marker.exists() and not out.exists()
    lines = [line for line in error.splitlines() if line.strip()]
    assert len(lines) == 1 and "vgg.pth: cannot read the lpips package's vgg.pth" in lines[0], error
    assert "Traceback" not in error
