"""The checked-in gRPC stubs in gen/ are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[2]
GEN = ROOT / "gen"


def _files(tree: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(tree)): p.read_bytes()
        for p in sorted(tree.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _load_generator(script: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"gen_protos_{abs(hash(script))}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stale_report(expected: dict[str, bytes], checked_in: dict[str, bytes]) -> str:
    missing = sorted(set(expected) - set(checked_in))
    extra = sorted(set(checked_in) - set(expected))
    differ = sorted(name for name in set(expected) & set(checked_in) if expected[name] != checked_in[name])
    return (
        f"gen/ is out of date with protos/: run `python scripts/gen_protos.py`. "
        f"missing: {missing}, not generated: {extra}, different: {differ}"
    )


def test_checked_in_stubs_are_byte_identical_to_freshly_generated_ones(tmp_path):
    generator = _load_generator(ROOT / "scripts" / "gen_protos.py")
    generator.generate(tmp_path / "out")
    fresh = _files(tmp_path / "out")
    checked_in = _files(GEN)
    # the generator really produced the service stubs (an empty run would compare trivially)
    assert {
        "belay/v1/belay_pb2.py",
        "belay/v1/belay_pb2.pyi",
        "belay/v1/belay_pb2_grpc.py",
        "belay/__init__.py",
        "belay/v1/__init__.py",
    } <= set(fresh)
    assert fresh == checked_in, _stale_report(fresh, checked_in)


def test_stub_comparison_catches_a_proto_edited_without_regenerating(tmp_path):
    """The check above is sensitive: a copy of the repo whose .proto gained a field generates stubs
    that differ from gen/, while an unedited copy generates identical ones."""
    for name, edit in (("same", False), ("edited", True)):
        copy = tmp_path / name
        shutil.copytree(ROOT / "protos", copy / "protos")
        (copy / "scripts").mkdir()
        shutil.copy(ROOT / "scripts" / "gen_protos.py", copy / "scripts" / "gen_protos.py")
        if edit:
            proto = copy / "protos" / "belay" / "v1" / "belay.proto"
            text = proto.read_text()
            assert "message InfoRequest {}" in text
            proto.write_text(text.replace("message InfoRequest {}", "message InfoRequest {\n  bool verbose = 1;\n}"))
        _load_generator(copy / "scripts" / "gen_protos.py").generate(copy / "out")
        fresh, checked_in = _files(copy / "out"), _files(GEN)
        if edit:
            assert fresh != checked_in
            assert fresh["belay/v1/belay_pb2.py"] != checked_in["belay/v1/belay_pb2.py"]
        else:
            assert fresh == checked_in, _stale_report(fresh, checked_in)
