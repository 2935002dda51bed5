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


# a second hostile probe (2026-12-07): files that cost more than their bytes while they were read

def deflated(archive: bytes) -> bytes:
    bomb = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member))
    return bomb.getvalue()


def test_a_nested_key_is_refused_before_unpickling_where_hashing_it_crashed_or_ran_for_good():
    """A tuple key nested a million deep (1 MB) crashed the process: hashing it overflowed the C
    stack. One sharing a tuple twice at each of 30 levels (~70 bytes) hashed 2^30 times. Both are
    now refused from the opcodes (`pickle_scan`), in the NVlabs reader and in torch archives."""
    deep_key = b"\x80\x02}K\x01" + b"\x85" * 200 + b"K\x02s."  # {((…(1,)…),): 2}
    shared_key = b"\x80\x02}K\x01" + b"2\x86" * 30 + b"K\x02s."  # {(x, x) with x = (y, y) …: 2}
    started = time.perf_counter()
    with pytest.raises(UnsafePickle, match="over 100 deep"):
        load_network_pickle(deep_key)
    with pytest.raises(UnsafePickle, match="dict key"):
        load_network_pickle(shared_key)
    archive = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved({"w": torch.zeros(1)}))) as source, zipfile.ZipFile(archive, "w") as target:
        for member in source.infolist():
            target.writestr(member.filename, shared_key if member.filename.endswith("data.pkl") else source.read(member))
    with pytest.raises(CheckpointError, match="dict key"):
        load_torch_archive(archive.getvalue())
    assert time.perf_counter() - started < 5
    assert load_network_pickle(pickle.dumps({"G": {(1, 2): 3, "a": [[[1]]]}}, protocol=2)) == {"G": {(1, 2): 3, "a": [[[1]]]}}


def test_a_tensor_the_pickle_reshapes_after_building_it_is_refused():
    """The unpickler's BUILD on a tensor is `set_`, past the checks its rebuild passed: a zero
    stride made a 306 KB pickle's tensor 16 GiB, and a `set_` grew a storage of torch's older
    format (as every storage in an NVlabs pickle is) with heap memory, exported as weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor = pickle.dumps(torch.zeros(4), protocol=3)  # (bytes as BINBYTES: NVlabs pickles are 3 or newer)
    assert torch.equal(load_network_pickle(tensor), torch.zeros(4))  # (a storage in the older format loads)
    with pytest.raises(UnsafePickle, match="re-shapes a tensor"):
        load_network_pickle(tensor[:-1] + b"Nb.")  # the same tensor, then BUILD with any state


def test_a_deflated_storage_inside_a_network_pickle_is_refused_before_it_is_expanded():
    """A storage is a torch.save archive within the pickle: deflated, 1 MB grew into 1 GiB."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(16 * 2**20 // 4).untyped_storage(), buffer)
    bomb = deflated(buffer.getvalue())
    hostile = b"\x80\x02ctorch.storage\n_load_from_bytes\nB" + len(bomb).to_bytes(4, "little") + bomb + b"\x85R."
    with pytest.raises(UnsafePickle, match="expand to"):
        load_network_pickle(hostile)


def test_a_network_larger_than_the_file_can_fill_is_refused_before_it_is_built():
    """Each size in a configuration is bounded, not their product: a 406-byte pickle asked for a
    12 GB StyleGAN, and a 12 KB BigGAN folder for 31 GB, built before any tensor was compared.
    The build is tried on the meta device first. Empty tensors with sizes, from which widths are
    read at no cost in the file ([8000, 0, 3, 3]), are refused too."""
    from torch import nn

    from repository.importers.checkpoint import built_within, check_tensors

    with pytest.raises(CheckpointError, match="builds a network of 400,020,000 values"):
        built_within(lambda: nn.Linear(20_000, 20_000), file_values=1_000)
    assert isinstance(built_within(lambda: nn.Linear(100, 100), file_values=10_100), nn.Linear)
    with pytest.raises(CheckpointError, match="empty but sized"):
        check_tensors({"model.0.weight": torch.empty(8000, 3, 3, 0)})
    check_tensors({"empty": torch.empty(0)})


def test_an_error_quoting_the_files_names_is_one_plain_line(tmp_path):
    """The CLI printed errors through rich's markup: a tensor named `[/x].100` raised a MarkupError
    (a traceback), and an ESC in a name reached the terminal."""
    for name in ("[/x]", "\x1b]0;pwned\x07"):
        checkpoint = tmp_path / "net.pt"
        checkpoint.write_bytes(saved({f"{name}.100": torch.zeros(1)}))
        result = CliRunner().invoke(app, ["import", str(checkpoint), "--name", "probe", "--repository", str(tmp_path / "repo"), "--format", "superres"])
        assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit), result.output
        assert "import failed:" in result.output and "numbered up to 100" in result.output and "\x1b" not in result.output, result.output


def test_what_a_pickle_sets_on_a_global_stays_with_that_load():
    """A BUILD on a global the unpickler hands out set its attributes for the rest of the process:
    one load made `EasyDict.__len__` `set`. Each load now gets its own copies."""
    from repository.importers import safe_pickle

    def text(value: str) -> bytes:
        return b"X" + len(value).to_bytes(4, "little") + value.encode()

    on_class = b"\x80\x02cdnnlib.util\nEasyDict\nN}" + text("__len__") + b"cbuiltins\nset\ns\x86b."
    on_function = b"\x80\x02ctorch._utils\n_rebuild_parameter\nN}" + text("__defaults__") + b"\x89K\x01\x86s\x86b."
    load_network_pickle(on_class)
    load_network_pickle(on_function)
    assert len(safe_pickle.EasyDict(a=1)) == 1 and safe_pickle.rebuild_parameter.__defaults__ == (True, None)


def test_a_spandrel_layout_wider_than_its_file_is_refused_before_it_is_built(tmp_path):
    """HAT reads its width off the first convolution: widened to 4,096 channels in a 3 MB file,
    it built a network of 2.7 GB before finding that no other tensor fitted (7.4 s; 16,384
    channels would ask for ~40 GB). The dry run on meta tensors could not be made for HAT (its
    constructor reads numbers off tensors it makes), and for no architecture at all got past
    spandrel's move to the CPU, so what a layout builds was never counted. Now it is, for
    ESRGAN and HAT alike, and the wide file is refused from shapes (0.9 GB peak, the CLI's own),
    at its first weight too large for the file (`checkpoint.TensorsWithin`)."""
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.HAT import HAT

    from repository.importers.checkpoint import tensor_values
    from repository.importers.superres import check_spandrel_size

    hat = HAT(embed_dim=96, depths=(2,), num_heads=(2,), window_size=8, upscale=4, num_feat=16).state_dict()
    for state in (hat, ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=2, scale=4).state_dict()):
        assert check_spandrel_size(state) == tensor_values(state)  # (tried, and the file fills it)
    hat |= {"conv_first.weight": torch.randn(4096, 3, 3, 3), "conv_first.bias": torch.zeros(4096)}
    checkpoint = tmp_path / "hat.pth"
    checkpoint.write_bytes(saved(hat))
    result = CliRunner().invoke(app, ["import", str(checkpoint), "--name", "probe", "--repository", str(tmp_path / "repo"), "--format", "superres"])
    assert result.exit_code == 1, result.output
    # refused from shapes: the first 4096-wide weight is over what the file's values allow
    assert "its layout makes a tensor of 50,331,648 values" in result.output and "4096" in result.output, result.output


def test_a_buffer_a_constructor_computes_from_a_files_shape_is_bounded_before_it_is_made(tmp_path):
    """HAT's window side is the square root of `relative_position_index_SA`'s first dimension, and
    its constructor computes a [side², side²] index table: a 2.8 MB file holding that tensor as
    [9216, 1] had the dry run itself make 3.4 GB (side 96; side 256 asks for ~70 GB). Every
    operation of the build is now sized on meta tensors first (`checkpoint.TensorsWithin`)."""
    from spandrel.architectures.HAT import HAT

    hat = HAT(embed_dim=96, depths=(2,), num_heads=(2,), window_size=8, upscale=4, num_feat=16).state_dict()
    hat["relative_position_index_SA"] = torch.zeros(96 * 96, 1, dtype=torch.long)
    checkpoint = tmp_path / "hat.pth"
    checkpoint.write_bytes(saved(hat))
    result = CliRunner().invoke(app, ["import", str(checkpoint), "--name", "probe", "--repository", str(tmp_path / "repo"), "--format", "superres"])
    assert result.exit_code == 1, result.output
    assert "its layout makes a tensor of 169,869,312 values" in result.output, result.output


def superres_import(tmp_path, state: dict) -> str:
    """`ganserve import --format superres` of `state` saved as a .pth: the CLI's output (exit 1 asserted)."""
    checkpoint = tmp_path / "net.pth"
    checkpoint.write_bytes(saved(state))
    result = CliRunner().invoke(app, ["import", str(checkpoint), "--name", "probe", "--repository", str(tmp_path / "repo"), "--format", "superres"])
    assert result.exit_code == 1, result.output
    return result.output


def test_spandrel_files_whose_layouts_outgrow_them_are_refused_before_they_are_built(tmp_path):
    """A third probe's files, each refused from the file's own count of values and tensors:
    - every tensor of an ESRGAN of 400 blocks a view of one storage of 110,592 values (1.8 MB):
      summed per key the file "held" 72 M values, and a 288 M-value network was built and exported
      (2.8 GB, killed at 120 s);
    - RCAN, whose `sub_mean` keeps the dry run from being made, with depths read off numbered
      one-value keys (14.7 KB): 64 x 100 residual blocks built (2.8 GB, 18 s) before the load
      named the missing tensors;
    - 20,004 one-value keys (2.9 MB) that spandrel's SwinIR detection scanned once per layer (48 s)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    with torch.device("meta"):
        shapes = {key: value.shape for key, value in ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=40, scale=4).state_dict().items()}
    shared = torch.zeros(max(shape.numel() for shape in shapes.values()))
    output = superres_import(tmp_path, {key: shared[:shape.numel()].view(shape) for key, shape in shapes.items()})
    assert "the file holds 110,592 values in" in output and "builds only what the file's tensors can fill" in output, output

    one = torch.zeros(1)
    rcan = {"sub_mean.weight": torch.zeros(3, 3, 1, 1), "head.0.weight": torch.zeros(1, 1, 1, 3), "tail.1.weight": torch.zeros(3, 1),
            "body.0.body.0.body.0.weight": one.clone(), "body.0.body.0.body.3.conv_du.0.weight": torch.zeros(4)}
    rcan |= {f"body.{i}.w": one.clone() for i in (*range(0, 64, 4), 64)} | {f"body.0.body.{j}.w": one.clone() for j in (*range(0, 100, 4), 100)}
    output = superres_import(tmp_path, rcan)
    assert "builds more than" in output and "builds only what the file's tensors can fill" in output, output

    output = superres_import(tmp_path, {f"layers.{i}.w": one for i in range(9000)})
    assert "the file holds 9,000 tensors; a super-resolution state dict is taken with at most 8,192" in output, output


def test_a_super_resolution_scale_the_entry_cannot_hold_is_refused_before_the_export(tmp_path):
    """FDAT reads its scale off a tensor's values: a real 146 KB FDAT at x32 went through a sample,
    the ONNX export and its parity runs at 32 times the input's side (4.7 GB, 39 s) before its
    entry's scale (at most x16) was refused."""
    from spandrel.architectures.FDAT import FDAT

    state = FDAT(scale=32, embed_dim=16, num_groups=1, depth_per_group=1, num_heads=2, upsampler_type="nearest+conv", mid_dim=16).state_dict()
    assert "FDAT at scale x32: /upscale serves x1 to x16" in superres_import(tmp_path, state)
