"""A checkpoint is hostile input: users import files they downloaded. Each file here is a few
bytes or kilobytes that once made `ganserve import` allocate gigabytes, build a network of a
million layers, export heap memory as weights, or write outside the repository (a hostile probe,
2026-12-02). Each must now be refused at once with one line naming what is wrong."""
from __future__ import annotations

import collections
import io
import pickle
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ganserve_cli import app
from repository.importers.checkpoint import CheckpointError, load_torch_archive, plain
from repository.importers.nvlabs import check_sizes
from repository.importers.safe_pickle import UnsafePickle, load_network_pickle

SG2 = {"z_dim": 8, "w_dim": 8, "c_dim": 0, "img_resolution": 32, "img_channels": 3, "mapping_kwargs": {"num_layers": 2}, "synthesis_kwargs": {}}


def saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_a_name_that_leaves_the_repository_is_refused_and_nothing_outside_is_touched(tmp_path):
    victim = tmp_path / "victim" / "1"
    victim.mkdir(parents=True)
    (victim / "data.txt").write_text("keep")
    checkpoint = tmp_path / "net.pkl"
    checkpoint.write_bytes(b"\x80\x04N.")
    for name in (f"/../../../..{tmp_path}/victim", "../victim", "a/b", ".hidden", ""):
        result = CliRunner().invoke(app, ["import", str(checkpoint), "--name", name, "--repository", str(tmp_path / "repo")])
        assert result.exit_code == 1 and "model name" in result.output, (name, result.output)
    assert (victim / "data.txt").read_text() == "keep" and sorted(p.name for p in victim.iterdir()) == ["data.txt"]


def test_a_tensor_larger_than_its_storage_is_refused_before_any_arithmetic():
    """A zero stride repeats one saved value: 4 bytes in the file, 2.5 GB once multiplied."""
    with pytest.raises(CheckpointError, match="over a storage of 4 bytes"):
        load_torch_archive(saved({"style.1.weight": torch.zeros(1).expand(25_000, 25_000)}))


def test_a_pickled_tensor_reaching_past_its_storage_is_refused_not_filled_from_the_heap():
    """`set_` grows a storage that is too small: a [32, 32] tensor over one value once came back
    holding 1,023 floats of the import process's uninitialised memory, exported as weights."""

    class Reaching:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (torch.zeros(1).storage(), 0, (32, 32), (32, 1), False, collections.OrderedDict())

    with warnings.catch_warnings():  # TypedStorage, as NVlabs pickles hold them, is deprecated
        warnings.simplefilter("ignore")
        data = pickle.dumps({"G_ema": Reaching()}, protocol=4)
    with pytest.raises(UnsafePickle, match="reaches past its storage"):
        load_network_pickle(data)


def forged_object_scalar(flags: int = 0, type_name: str = "O8") -> bytes:
    """A numpy scalar whose dtype the pickle BUILDs with forged flags: with flags 0 an object
    dtype said it held no objects, and the file's 8 bytes were read as an object pointer."""
    args = pickle.dumps((type_name, False, True), 2)[2:-1]
    state = pickle.dumps((3, "|", None, None, None, -1, -1, flags), 2)[2:-1]
    return (b"\x80\x03}(X\x05\x00\x00\x00G_emacnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n" + args + b"R" + state + b"b"
            + b"C\x08" + b"A" * 8 + b"tRu.")


def test_a_forged_numpy_dtype_or_an_array_of_any_shape_is_refused_before_numpy_reads_it():
    """164 bytes crashed the import process (signal 11: the bytes became a pointer); calling
    numpy.ndarray itself allocated any shape asked for (240 bytes held 4.5 GB)."""
    with pytest.raises(UnsafePickle, match="numeric arrays only"):
        load_network_pickle(forged_object_scalar())
    # a number type with object flags: the flags are dropped, the value read as the number it is
    assert int(load_network_pickle(forged_object_scalar(flags=63, type_name="u8"))["G_ema"]) == int.from_bytes(b"A" * 8, "little")
    allocating = b"\x80\x02}X\x05\x00\x00\x00G_emacnumpy\nndarray\n(J\x00\x00\x00\x40tR" + b"s."  # ndarray((2**30,))
    with pytest.raises(UnsafePickle, match="damaged"):
        load_network_pickle(allocating)
    plain = load_network_pickle(pickle.dumps({"G_ema": np.arange(6, dtype=np.float32).reshape(2, 3)}, protocol=4))["G_ema"]
    assert np.array_equal(np.asarray(plain), np.arange(6, dtype=np.float32).reshape(2, 3))  # what NumPy writes still loads


def test_layers_numbered_far_past_their_count_are_refused():
    """Depth is read from the highest number: `body.2000000` in a 118 KB file once asked for a million convolutions."""
    tensor = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="numbered up to 2000000 but only 3"):
        load_torch_archive(saved({"body.0.weight": tensor, "body.1.weight": tensor.clone(), "body.2000000.weight": tensor.clone()}))
    load_torch_archive(saved({f"model.{i}.weight": tensor.clone() for i in (1, 4, 7, 10, 13, 16, 19)}))  # gaps of activations and norms pass


def test_a_compressed_archive_member_is_refused_before_it_is_expanded():
    """torch.save stores its members; a deflated one turned 205 KB into 200 MB."""
    plain_archive = saved({"w": torch.zeros(16 * 2**20 // 4)})
    bomb = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(plain_archive)) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member))
    assert len(bomb.getvalue()) < 16 * 2**20 // 100
    with pytest.raises(CheckpointError, match="expand to"):
        load_torch_archive(bomb.getvalue())


def test_a_configuration_that_contains_itself_or_explodes_is_refused_quickly():
    cycle: list = []
    cycle.append(cycle)
    laughs: list = [1]
    for _ in range(40):  # 2^40 values once expanded
        laughs = [laughs, laughs]
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    started = time.perf_counter()
    for hostile in (cycle, laughs, deep):
        with pytest.raises(CheckpointError, match="configuration"):
            plain({"args": hostile})
    assert time.perf_counter() - started < 5
    assert plain({"size": 256, "channels": {4: 512}, "lr": (0.01,)}) == {"size": 256, "channels": {"4": 512}, "lr": [0.01]}


@pytest.mark.parametrize("change,what", [({"c_dim": 10**9}, "c_dim"), ({"z_dim": 10**6}, "z_dim"), ({"img_resolution": 2**20}, "img_resolution"),
                                         ({"img_resolution": 48}, "power of 2"), ({"mapping_kwargs": {"num_layers": 10**8}}, "num_layers"),
                                         ({"z_dim": [1, 2]}, "z_dim"), ({"z_dim": float("inf")}, "z_dim"), ({"mapping_kwargs": [1]}, "must be dicts")])
def test_nvlabs_sizes_are_bounded_before_anything_is_built(change, what):
    """A 308 KB pickle with `c_dim` 10^9 once asked for a billion class names."""
    check_sizes(SG2)
    with pytest.raises(CheckpointError, match=what):
        check_sizes(SG2 | change)


def test_weights_with_nan_are_refused_before_the_export_not_by_its_parity_check():
    from torch import nn

    from repository.importers.checkpoint import load_checked

    generator = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="weight holds NaN or infinity"):
        load_checked(generator, {"weight": torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), "bias": torch.zeros(2)})
    load_checked(generator, {"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    assert torch.equal(generator.weight, torch.ones(2, 2))
