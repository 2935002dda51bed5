"""BigGAN-deep checkpoints of the `pytorch-pretrained-biggan` port (a folder with `config.json` and
`pytorch_model.bin`) → the project's `BigGANDeepGenerator`.

Every layer of the port but the class embedding is wrapped in torch's `spectral_norm`, and its
eval-mode forward divides each stored `weight_orig` by σ = uᵀ·W·v from the stored `weight_u` and
`weight_v`, without a power iteration. The import does that division once, so our layers are
plain. It also explains the NaN the port gives for randomly initialised weights: a fresh
`spectral_norm` draws u and v at random, so uᵀ·W·v is a random projection, not the largest singular
value (1.2e-5 against a true 2.18 on one 128-px layer); the weights are then scaled by ~10⁵ and
the activations overflow. Published checkpoints carry u and v after a power iteration from the TF
weights' own `u0`, so their σ is the true one; a checkpoint whose σ is far from it (saved before
any training step) is refused with that reason, since the port itself would give garbage.

Checkpoints written by torch before spectral_norm kept `weight_v` hold the normalised `weight`
instead; σ is then mean(weight_orig / weight), as torch's own loader recovers it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from models.biggan import BigGANDeepGenerator, GBlock
from models.spec import ModelSpec
from models.zoo import build_generator
from repository.importers.checkpoint import MAX_CLASSES, CheckpointError, ImportedGenerator, TensorSource, bounded, built_within, load_checked, load_torch_archive, plain, tensor_values

CONFIG_NAME, WEIGHTS_NAME = "config.json", "pytorch_model.bin"
MAX_CONFIG_BYTES = 1 << 20  # a BigGAN config.json is under a kilobyte
IMAGENET_CLASSES = Path(__file__).resolve().parent.parent / "imagenet_classes.txt"
SIGMA_AGREEMENT = 0.5  # the stored u, v must give at least half the largest singular value


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(config.json, pytorch_model.bin) from the folder, or from a weights file with its config beside it."""
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_NAME if path.is_dir() else path
    config = folder / CONFIG_NAME
    for needed in (config, weights):
        if not needed.is_file():
            raise CheckpointError(f"a BigGAN checkpoint is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}: {needed.name} is missing "
                                  f"(or not a regular file) in {folder.name}")
    return config, weights


def is_biggan(path: Path) -> bool:
    """A folder, or its `pytorch_model.bin`, with a config.json (the port's layout: its importer
    then names what is wrong with the config, where detection once fell through to the
    super-resolution importer and a message about SR architectures); or any file whose folder
    holds a config.json with BigGAN's keys."""
    config = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if path.is_dir() or path.name == WEIGHTS_NAME:
        return config.exists()
    try:  # a regular file of a config's size: /dev/zero or a FIFO named config.json once read without end
        if not config.is_file() or config.stat().st_size > MAX_CONFIG_BYTES:
            return False
        return {"layers", "n_stats", "channel_width"} <= set(json.loads(config.read_text()))
    except (OSError, ValueError, TypeError):
        return False


def checked_config(config: dict) -> dict:
    """The port's configuration, checked before anything is built."""
    try:
        layers = [(bool(up), int(i), int(o)) for up, i, o in config["layers"]]
        checked = {"z_dim": int(config["z_dim"]), "class_embed_dim": int(config.get("class_embed_dim", config["z_dim"])),
                   "channel_width": int(config["channel_width"]), "num_classes": int(config["num_classes"]), "layers": layers,
                   "attention_layer_position": int(config["attention_layer_position"]), "eps": float(config.get("eps", 1e-4)),
                   "n_stats": int(config.get("n_stats", 51)), "output_dim": int(config["output_dim"])}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{CONFIG_NAME} is not a BigGAN configuration ({type(error).__name__}: {error})") from None
    for name, high in (("z_dim", 4096), ("channel_width", 4096), ("num_classes", MAX_CLASSES), ("n_stats", 1000), ("output_dim", 2048)):
        bounded(name, checked[name], 0, high)
    bounded("the number of layers", len(layers), 1, 64)
    for _, i, o in layers:
        bounded("a layer's channel multiplier", max(i, o), 1, 64)
    if checked["class_embed_dim"] != checked["z_dim"]:
        raise CheckpointError("BigGAN-deep concatenates z and the class embedding: class_embed_dim must equal z_dim")
    resolution = 4 * 2 ** sum(up for up, _, _ in layers)
    if resolution != checked["output_dim"]:
        raise CheckpointError(f"the layers upsample 4x4 to {resolution}², but output_dim says {checked['output_dim']}")
    if checked["n_stats"] < 2 or min(checked["z_dim"], checked["channel_width"], checked["num_classes"]) < 1:
        raise CheckpointError(f"{CONFIG_NAME} has sizes below 1 or fewer than 2 truncation statistics")
    return checked


def folded_weight(source: TensorSource, name: str) -> torch.Tensor:
    """A spectrally normalised weight as the port's eval forward uses it: weight_orig / (uᵀ W v)."""
    weight = source.take(f"{name}.weight_orig")
    matrix = weight.reshape(weight.shape[0], -1)
    if f"{name}.weight_v" in source.tensors:
        u, v = source.take(f"{name}.weight_u"), source.take(f"{name}.weight_v")
        if u.shape != (matrix.shape[0],) or v.shape != (matrix.shape[1],):
            raise CheckpointError(f"{name}'s spectral-norm vectors do not fit its weight {list(weight.shape)}")
        sigma = torch.dot(u, matrix @ v)
    else:  # an old layout: the normalised weight itself is stored
        source.take(f"{name}.weight_u")
        sigma = (weight / source.take(f"{name}.weight")).mean()
    largest = torch.linalg.matrix_norm(matrix.double(), ord=2).item()
    if not torch.isfinite(sigma) or sigma.item() < SIGMA_AGREEMENT * largest:
        raise CheckpointError(f"{name}'s stored spectral-norm vectors give σ = {sigma.item():.3g} but its largest singular value is "
                              f"{largest:.3g}: the checkpoint was saved before any power iteration and its outputs would overflow")
    return weight / sigma


def folded_tensors(state: dict[str, torch.Tensor], generator: BigGANDeepGenerator) -> dict[str, torch.Tensor]:
    source = TensorSource(state, "a BigGAN-deep of this configuration")
    out = {"class_embedding.weight": source.take("embeddings.weight").t().contiguous()}
    out["project.weight"] = folded_weight(source, "generator.gen_z")
    out["project.bias"] = source.take("generator.gen_z.bias")
    attention = {"query": "snconv1x1_theta", "key": "snconv1x1_phi", "value": "snconv1x1_g", "out": "snconv1x1_o_conv"}
    for index, block in enumerate(generator.blocks):
        theirs, ours = f"generator.layers.{index}", f"blocks.{index}"
        if isinstance(block, GBlock):
            for k in range(4):
                for stat in ("running_means", "running_vars"):
                    out[f"{ours}.norms.{k}.{stat}"] = source.take(f"{theirs}.bn_{k}.{stat}")
                for part in ("scale", "offset"):
                    out[f"{ours}.norms.{k}.{part}.weight"] = folded_weight(source, f"{theirs}.bn_{k}.{part}")
                out[f"{ours}.convs.{k}.weight"] = folded_weight(source, f"{theirs}.conv_{k}")
                out[f"{ours}.convs.{k}.bias"] = source.take(f"{theirs}.conv_{k}.bias")
        else:
            for mine, port in attention.items():
                out[f"{ours}.{mine}.weight"] = folded_weight(source, f"{theirs}.{port}")
            out[f"{ours}.gamma"] = source.take(f"{theirs}.gamma")
    for stat in ("running_means", "running_vars", "weight", "bias"):
        out[f"norm_out.{stat}"] = source.take(f"generator.bn.{stat}")
    channels = generator.to_rgb.out_channels  # the port computes channel_width outputs and keeps the first 3
    out["to_rgb.weight"] = folded_weight(source, "generator.conv_to_rgb")[:channels]
    out["to_rgb.bias"] = source.take("generator.conv_to_rgb.bias")[:channels]
    source.check_all_used()
    return out


def class_names_for(num_classes: int, names_file: Path | None) -> list[str]:
    """Names from the user's file (one per line), ImageNet's for a 1000-class model, else indices."""
    if names_file is not None:
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) != num_classes or len(set(names)) != len(names):
            raise CheckpointError(f"{names_file} must hold {num_classes} distinct class names, one per line; it holds {len(names)}")
        return names
    if num_classes == 1000:
        return IMAGENET_CLASSES.read_text().splitlines()
    return [str(i) for i in range(num_classes)]


def import_biggan(path: Path, weights: bytes | None = None, class_names_file: Path | None = None) -> ImportedGenerator:
    """`weights`: the weights file's bytes when the caller has read them already (to hash them)."""
    config_file, weights_file = checkpoint_files(path)
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{CONFIG_NAME} is over {MAX_CONFIG_BYTES} bytes: not a BigGAN configuration")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as error:
        raise CheckpointError(f"{CONFIG_NAME} is not JSON ({error})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{CONFIG_NAME} is not a BigGAN configuration")
    config = checked_config(raw)
    state = load_torch_archive(weights if weights is not None else weights_file.read_bytes())
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "embeddings.weight" not in state or "generator.gen_z.weight_orig" not in state:
        raise CheckpointError(f"{WEIGHTS_NAME} holds no BigGAN generator (embeddings.weight, generator.gen_z.*)")
    options = {key: config[key] for key in ("channel_width", "attention_layer_position", "eps", "n_stats")}
    options["layers"] = [list(layer) for layer in config["layers"]]
    spec = ModelSpec(arch="biggan-deep", kind="conditional", z_dim=config["z_dim"], resolution=config["output_dim"], channels=3,
                     class_names=class_names_for(config["num_classes"], class_names_file), options=options)
    generator = built_within(lambda: build_generator(spec), tensor_values(state))
    load_checked(generator, folded_tensors(state, generator))
    return ImportedGenerator(generator.eval(), spec, {"config": plain(raw)})
