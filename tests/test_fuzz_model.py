"""Fuzzing of model-file input: seeded mutations of a tiny model's GGUF header through
``pyadaq.Llama`` in child processes. Every mutation must end in a Python exception or a
working model, never in a crash: bad input is rejected before native code can abort.

The mutations target the header's structured fields, found by parsing the tiny model's
layout: the tensor and key counts, key and string lengths, metadata value types and
array element types and counts, scalar values (the hyper-parameters), tensor name lengths,
n_dims, shapes (and transposed ones), ggml types (ids llama.cpp's range check lets through
included) and data offsets, bytes of key and tensor names (or another name copied over);
plus truncation at random points and random byte flips in the header. A quarter of them
combine two or three. Two tiny models are mutated in turn: a llama and an iSWA gemma3.
Mutation ``i`` of seed ``s`` is a pure function of (s, i) and the model, so a failure names
what reproduces it::

    python tests/test_fuzz_model.py repro --seed S --index I OUT.gguf

writes the mutated file (``python -c "import pyadaq; pyadaq.Llama('OUT.gguf', n_ctx=64)"``
then shows the crash). ``PYADAQ_FUZZ_SEED`` / ``PYADAQ_FUZZ_N`` change the seed and the
number of mutations; ``PYADAQ_FUZZ_KINDS=scalar,flip`` keeps only those kinds of mutation
(a different set of mutations: set it for ``repro`` too).
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SEED = int(os.environ.get("PYADAQ_FUZZ_SEED", "20250611"))
N_MUTATIONS = int(os.environ.get("PYADAQ_FUZZ_N", "2000"))
BATCH = 150  # mutations per child process
PARALLEL = 2  # child processes at a time
STALL_S = 60  # a child that reports nothing for this long is hung
MEMORY_LIMIT = 4 << 30  # resident bytes: a 3 MB model file must not need more

# the two tiny models mutated (mutation i uses MODELS[i % 2]); tiny_model(**kwargs)
MODELS = ({}, {"arch": "gemma3", "sliding_window": 32})

# GGUF value types (gguf.h) and their little-endian formats
_VT_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


# --- header layout ------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    pos: int
    size: int  # bytes: 4 / 8 for the format's own u32 / u64 fields, else the scalar's size
    label: str
    value: object
    vtype: int = -1  # GGUF value type of a metadata scalar, -1 for a format field


def layout(data: bytes) -> dict[str, object]:
    """Where each structured field of a (well-formed) GGUF header lies."""
    pos = 8  # after the magic and the version
    f: dict[str, list[Field]] = {k: [] for k in (
        "count", "key_len", "kv_type", "str_len", "arr_type", "arr_len", "arr_str_len", "scalar",
        "name_len", "n_dims", "dim", "ttype", "toffset")}

    def field(kind: str, size: int, label: str, vtype: int = -1) -> Field:
        """Record the field at pos and move past it."""
        nonlocal pos
        fmt = {4: "<I", 8: "<Q"}[size] if vtype < 0 else _VT_FMT[vtype]
        fl = Field(pos, struct.calcsize(fmt), label, struct.unpack_from(fmt, data, pos)[0], vtype)
        f[kind].append(fl)
        pos += fl.size
        return fl

    n_tensors = field("count", 8, "n_tensors").value
    n_kv = field("count", 8, "n_kv").value
    for _ in range(n_kv):
        klen = field("key_len", 8, "key length").value
        key = data[pos:pos + klen].decode()
        pos += klen
        t = field("kv_type", 4, f"value type of {key}").value
        if t == _STRING:
            n = field("str_len", 8, f"string length of {key}").value
            pos += n
        elif t == _ARRAY:
            at = field("arr_type", 4, f"element type of {key}").value
            n = field("arr_len", 8, f"element count of {key}").value
            if at == _STRING:
                for j in range(n):
                    sl = field("arr_str_len", 8, f"length of {key}[{j}]").value
                    pos += sl
            else:
                pos += n * struct.calcsize(_VT_FMT[at])
        else:
            field("scalar", 0, key, vtype=t)
    for _ in range(n_tensors):
        nlen = field("name_len", 8, "tensor name length").value
        name = data[pos:pos + nlen].decode()
        pos += nlen
        nd = field("n_dims", 4, f"n_dims of {name}").value
        for j in range(nd):
            field("dim", 8, f"ne[{j}] of {name}")
        field("ttype", 4, f"type of {name}")
        field("toffset", 8, f"offset of {name}")
    return {"fields": f, "header_end": pos, "size": len(data)}


# --- mutations ----------------------------------------------------------------------------
# ggml type ids: upstream's 0..42 (some retired), 43..99 unused (but inside the patched
# build's GGML_TYPE_COUNT), pyadaq's 100, 101, 110..115, its calibrated cache types 102..109 and 116
# (no tensor type: refused), and beyond.
def _type_id(rng: random.Random, orig: int) -> int:
    r = rng.random()
    if r < 0.15:  # the same bytes per element as an f32 / f16 tensor: passes the size checks
        return rng.choice({0: [26], 1: [25, 30]}.get(orig, [0, 1]))
    if r < 0.35:
        return rng.randrange(0, 43)
    if r < 0.55:
        return rng.randrange(43, 100)
    if r < 0.65:
        return rng.choice([100, 101, *list(range(110, 116))])
    if r < 0.80:
        return rng.randrange(102, 110)
    return rng.choice([116, 117, 118, 255, 256, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1])


def _int_variant(rng: random.Random, orig: int, bits: int, step: int = 32) -> int:
    top = 1 << bits
    c = rng.choice([
        orig + 1, orig - 1, 0, 1, top - 1, top - 2, top >> 1, (top >> 1) - 1, orig * 2, orig // 2,
        orig + step, orig - step, orig + (1 << 32), 1 << 32, 1 << 31, (1 << 31) - 1, 1 << 16, 1 << 24,
        rng.randrange(top), rng.randrange(2 * orig + 16), orig ^ (1 << rng.randrange(bits)),
    ])
    return c % top


def _put(buf: bytearray, fl: Field, v) -> None:
    fmt = {4: "<I", 8: "<Q"}[fl.size] if fl.vtype < 0 else _VT_FMT[fl.vtype]
    if fl.vtype in (6, 7, 12):  # float, bool
        struct.pack_into(fmt, buf, fl.pos, v)
    else:
        bits = 8 * struct.calcsize(fmt)
        v = v % (1 << bits)
        if fmt[1].islower():  # signed: store the bit pattern
            v = v - (1 << bits) if v >= 1 << (bits - 1) else v
        struct.pack_into(fmt, buf, fl.pos, v)


def _scalar_variant(rng: random.Random, fl: Field):
    if fl.vtype in (6, 12):
        return rng.choice([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 1e30,
                           -float(fl.value), 2 * float(fl.value)])
    if fl.vtype == 7:
        return None  # a bool: written as a raw byte below
    bits = 8 * fl.size
    return _int_variant(rng, int(fl.value) % (1 << bits), bits, step=1)


_KINDS = (  # kind, weight
    ("count", 6), ("key_len", 5), ("kv_type", 5), ("str_len", 5), ("arr_type", 5), ("arr_len", 6),
    ("arr_str_len", 4), ("scalar", 10), ("name_len", 5), ("n_dims", 6), ("dim", 10), ("ttype", 10),
    ("toffset", 6), ("truncate", 6), ("flip", 8), ("dim_swap", 3), ("key_text", 4), ("name_text", 4),
)


# PYADAQ_FUZZ_KINDS=scalar,flip,...: only those kinds (to explore; changes every mutation)
_ONLY = [k for k in os.environ.get("PYADAQ_FUZZ_KINDS", "").split(",") if k]
if _ONLY:
    _KINDS = tuple(kw for kw in _KINDS if kw[0] in _ONLY)


def _mutate_once(rng: random.Random, buf: bytearray, lay: dict) -> tuple[int | None, str]:
    """Apply one mutation to buf; returns (new file length or None, description)."""
    kinds, weights = zip(*_KINDS)
    kind = rng.choices(kinds, weights)[0]
    header_end = lay["header_end"]
    if kind == "truncate":
        if rng.random() < 0.7:
            n = rng.randrange(0, header_end + 64)
        else:
            n = rng.randrange(header_end, lay["size"])
        return n, f"truncate to {n} bytes"
    if kind == "flip":
        k = rng.randint(1, 8)
        where = [rng.randrange(header_end) for _ in range(k)]
        for p in where:
            buf[p] ^= rng.randrange(1, 256)
        return None, f"flip bytes at {where}"
    if kind == "dim_swap":  # same size, transposed: passes the offset checks
        fl = rng.choice([d for d in lay["fields"]["dim"] if d.label.startswith("ne[1]")])
        ne0 = lay["fields"]["dim"][lay["fields"]["dim"].index(fl) - 1]
        struct.pack_into("<QQ", buf, ne0.pos, fl.value, ne0.value)
        return None, f"swap ne[0], ne[1] of {fl.label[9:]}"
    if kind in ("key_text", "name_text"):  # one byte of a key or tensor name, or another name
        lens = lay["fields"]["key_len" if kind == "key_text" else "name_len"]
        fl = rng.choice(lens)
        same = [g for g in lens if g.value == fl.value and g is not fl]
        if same and rng.random() < 0.5:
            g = rng.choice(same)
            buf[fl.pos + 8:fl.pos + 8 + fl.value] = buf[g.pos + 8:g.pos + 8 + g.value]
            return None, f"{kind} @{fl.pos}: copy of the name @{g.pos}"
        p = fl.pos + 8 + rng.randrange(max(fl.value, 1))
        b = rng.choice([0, ord("."), ord("_"), ord("x"), rng.randrange(256)])
        buf[p] = b
        return None, f"{kind} byte @{p} -> {b}"
    fl = rng.choice(lay["fields"][kind])
    if kind == "ttype":
        v = _type_id(rng, fl.value)
    elif kind == "kv_type" or kind == "arr_type":
        v = rng.choice([rng.randrange(13), rng.randrange(13), 13, 14, 255, 1 << 31, (1 << 32) - 1])
    elif kind == "n_dims":
        v = rng.choice([0, 1, 2, 3, 4, 5, 8, 255, 1 << 31, (1 << 32) - 1, fl.value + 1, fl.value - 1])
    elif kind == "scalar":
        v = _scalar_variant(rng, fl)
        if v is None:
            b = rng.choice([0, 1, 2, 127, 255])
            buf[fl.pos] = b
            return None, f"bool {fl.label}: {fl.value} -> byte {b}"
    else:
        v = _int_variant(rng, int(fl.value), 8 * fl.size)
    _put(buf, fl, v)
    return None, f"{kind} {fl.label} @{fl.pos}: {fl.value} -> {v}"


def mutate(data: bytes, lay: dict, seed: int, index: int) -> tuple[bytes, str]:
    """Mutation `index` of `seed`: one to three field mutations, reproducible."""
    rng = random.Random(f"pyadaq-fuzz:{seed}:{index}")
    buf = bytearray(data)
    length: int | None = None
    notes = []
    for _ in range(1 if rng.random() < 0.75 else rng.randint(2, 3)):
        n, note = _mutate_once(rng, buf, lay)
        notes.append(note)
        if n is not None:
            length = n if length is None else min(length, n)
    out = bytes(buf if length is None else buf[:length])
    return out, "; ".join(notes)


# --- child: run a batch -------------------------------------------------------------------
def run_child(model: str, seed: int, start: int, count: int, report: str, n_models: int) -> None:
    """Try mutations start.. start+count-1 (those of this model: index % n_models); append a
    START line before each (flushed to the report, not fd 1/2) and an END line after."""
    import pyadaq

    models = model.split(os.pathsep)
    originals = [Path(m).read_bytes() for m in models]
    lays = [layout(d) for d in originals]
    with open(report, "a", buffering=1) as rep:
        for i in range(start, start + count):
            k = i % n_models
            data, _desc = mutate(originals[k], lays[k], seed, i)
            # a new file each time: rewriting one in place would truncate it under any mapping
            # that a failed load left behind
            path = f"{report}.{i}.gguf"
            with open(path, "wb") as f:
                f.write(data)
            rep.write(f"START {i}\n")
            rep.flush()
            try:
                llm = pyadaq.Llama(path, n_ctx=64)
            except pyadaq.ModelFileError as e:  # pyadaq's header check
                res = f"header:{type(e).__name__}"
            except Exception as e:
                res = f"{type(e).__module__}.{type(e).__name__}"
            else:
                llm.close()
                res = "ok"
            rep.write(f"END {i} {res}\n")
            rep.flush()
            os.remove(path)


def _read_report(report: Path) -> tuple[dict[int, str], int | None]:
    done: dict[int, str] = {}
    started = None
    for line in report.read_text().splitlines():
        parts = line.split(" ", 2)
        if parts[0] == "START":
            started = int(parts[1])
        elif parts[0] == "END" and len(parts) == 3:
            done[int(parts[1])] = parts[2]
    return done, (started if started is not None and started not in done else None)


# --- the tests ----------------------------------------------------------------------------
def _rss(pid: int) -> int:
    """Resident bytes of a process (0 where /proc is not there)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class _Job:
    proc: subprocess.Popen
    start: int
    count: int
    report: Path
    log_path: Path
    log: object
    progress: tuple[int, float] = (0, 0.0)  # report size, when it last grew


def test_fuzz_model_header(tiny_model, child_env, tmp_path):
    models = [tiny_model(**kw) for kw in MODELS]
    model_arg = os.pathsep.join(str(m) for m in models)
    env = child_env(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    results: dict[int, str] = {}
    crashes: list[tuple[int, str]] = []
    pending = [(s, min(BATCH, N_MUTATIONS - s)) for s in range(0, N_MUTATIONS, BATCH)]
    running: list[_Job] = []
    n_child = 0

    def launch(start: int, count: int) -> None:
        nonlocal n_child
        n_child += 1
        report, log_path = tmp_path / f"report-{n_child}.txt", tmp_path / f"log-{n_child}.txt"
        log = open(log_path, "wb")  # noqa: SIM115  (the job closes it when its child ends)
        cmd = [sys.executable, __file__, "child", model_arg, str(SEED), str(start), str(count), str(report),
               str(len(models))]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        running.append(_Job(proc, start, count, report, log_path, log, (0, time.monotonic())))

    def finish(job: _Job, rc, why: str) -> None:
        job.log.close()
        done, in_flight = _read_report(job.report) if job.report.exists() else ({}, None)
        results.update(done)
        end = job.start + job.count
        if rc == 0 and len(done) == job.count:
            return
        tail = job.log_path.read_bytes()[-600:].decode(errors="replace").strip()
        bad = in_flight if in_flight is not None else max(done, default=job.start - 1) + 1
        if bad >= end:  # all done, then died on the way out
            crashes.append((end - 1, f"child exited with {rc} after its last mutation ({why}): {tail}"))
            return
        k = bad % len(models)
        data = models[k].read_bytes()
        _, desc = mutate(data, layout(data), SEED, bad)
        crashes.append((bad, f"{desc} (model {models[k].name}; child {why}, exit {rc}): {tail}"))
        if bad + 1 < end:  # the rest of the batch in a new child
            pending.insert(0, (bad + 1, end - bad - 1))

    while pending or running:
        while pending and len(running) < PARALLEL:
            launch(*pending.pop(0))
        time.sleep(0.05)
        for job in list(running):
            rc = job.proc.poll()
            why = "died"
            if rc is None:
                now = time.monotonic()
                size = job.report.stat().st_size if job.report.exists() else 0
                if size != job.progress[0]:
                    job.progress = (size, now)
                rss = _rss(job.proc.pid)
                if rss > MEMORY_LIMIT:
                    why = f"killed at {rss >> 20} MiB resident"
                elif now - job.progress[1] > STALL_S:
                    why = f"killed after {STALL_S} s without progress"
                else:
                    continue
                job.proc.kill()
                rc = job.proc.wait()
            running.remove(job)
            finish(job, rc, why)

    if crashes:
        lines = [f"  seed {SEED} index {i}: {d}" for i, d in sorted(crashes)]
        pytest.fail(f"{len(crashes)} of {N_MUTATIONS} mutated model files crashed (or hung) the process "
                    "instead of raising a Python exception (reproduce: python tests/test_fuzz_model.py "
                    "repro --seed S --index I OUT.gguf):\n" + "\n".join(lines), pytrace=False)
    assert len(results) == N_MUTATIONS
    summary: dict[str, int] = {}
    for r in results.values():
        summary[r] = summary.get(r, 0) + 1
    print(f"\n{N_MUTATIONS} mutations (seed {SEED}):", dict(sorted(summary.items(), key=lambda kv: -kv[1])))
    # most mutations must be caught by pyadaq's header check, not left to llama.cpp
    assert _ONLY or sum(v for k, v in summary.items() if k.startswith("header:")) > N_MUTATIONS // 2


def test_foreign_tensor_type_rejected_in_python(tiny_model, tmp_path):
    """Type ids llama.cpp has no type for (43..99 pass the patched build's range check) are
    rejected by the header check, before any native code runs."""
    from pyadaq import ModelFileError, read_model_info

    data = tiny_model().read_bytes()
    ttypes = layout(data)["fields"]["ttype"]
    p = tmp_path / "m.gguf"
    for type_id in [*range(43, 100), *range(102, 110), 116, 117, 255, 1 << 31, (1 << 32) - 1]:
        for fl in (ttypes[0], ttypes[-1]):
            buf = bytearray(data)
            struct.pack_into("<I", buf, fl.pos, type_id)
            p.write_bytes(bytes(buf))
            with pytest.raises(ModelFileError, match=f"invalid ggml type id {type_id}"):
                read_model_info(p)


def _header_only(path: Path, arch: str, kvs: dict) -> Path:
    """A GGUF file with just these metadata keys (no tensors); ints are uint32."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in kvs.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_TOKENS = ["<unk>", "a", "b"]


@pytest.mark.parametrize("arch,kvs,message", [
    # what llama.cpp aborts on (GGML_ASSERT) instead of failing the load; the first three were
    # found by this fuzzing (block_count also made the header reader build huge per-layer tuples)
    ("llama", {"llama.block_count": 0}, "block_count' is 0"),
    ("llama", {"llama.block_count": 513}, "1 to 512 layers"),
    ("llama", {"llama.block_count": (1 << 32) - 1}, "block_count"),
    ("gemma3", {"gemma3.block_count": 2, "gemma3.attention.sliding_window": 32,
                "gemma3.attention.sliding_window_pattern": 1}, "makes no layer a sliding-window layer"),
    ("gemma3", {"gemma3.block_count": 2, "gemma3.attention.sliding_window": 32,
                "gemma3.attention.sliding_window_pattern": [False, False]}, "no layer a sliding-window"),
    ("llama", {"llama.block_count": 2, "tokenizer.ggml.model": "llama",
               "tokenizer.ggml.tokens": ["<unk>", "a", "b", "a"]}, "token 3 .*'a', repeats"),
    ("llama", {"llama.block_count": 2, "tokenizer.ggml.model": "llama",
               "tokenizer.ggml.tokens": ["<unk>", "a\0x", "a"]}, "token 2 .*repeats"),  # C strings
    ("llama", {"llama.block_count": 2, "tokenizer.ggml.model": "llama",
               "tokenizer.ggml.tokens": ["", "[EMPTY_0]"]}, "token 1 .*repeats"),
    # the other load_hparams asserts
    ("llama", {"llama.block_count": 2, "llama.nextn_predict_layers": 3}, "nextn_predict_layers' is 3"),
    ("llama", {"llama.block_count": 2, "llama.expert_count": 1025, "llama.expert_used_count": 2},
     "at most 1024 experts"),
    ("llama", {"llama.block_count": 2, "llama.expert_count": 8}, "expert_used_count' is 0"),
    ("llama", {"llama.block_count": 2, "llama.expert_count": 2, "llama.expert_used_count": 3}, "larger than"),
    ("llama", {"llama.block_count": 2, "llama.expert_used_count": 1}, "larger than"),
    ("llama", {"llama.block_count": 2, "llama.expert_count": 8, "llama.expert_used_count": 2,
               "llama.expert_group_count": 3, "llama.expert_group_used_count": 1},
     "not a valid expert grouping"),
    ("llama", {"llama.block_count": 2, "llama.expert_group_count": 2}, "without experts"),
    ("llama", {"llama.block_count": 2, "llama.rope.scaling.type": "bogus"}, "rope.scaling.type"),
])
def test_header_rejects_what_aborts_llama_cpp(tmp_path, arch, kvs, message):
    from pyadaq import ModelFileError, read_model_info

    with pytest.raises(ModelFileError, match=message):
        read_model_info(_header_only(tmp_path / "m.gguf", arch, kvs))


@pytest.mark.parametrize("arch,kvs", [
    ("llama", {"llama.block_count": 512}),
    ("gemma3", {"gemma3.block_count": 2, "gemma3.attention.sliding_window": 32,
                "gemma3.attention.sliding_window_pattern": 2}),
    ("gemma3", {"gemma3.block_count": 2, "gemma3.attention.sliding_window_pattern": 1}),  # no SWA
    ("llama", {"llama.block_count": 2, "tokenizer.ggml.model": "none", "tokenizer.ggml.tokens": ["a", "a"]}),
    ("llama", {"llama.block_count": 2, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": _TOKENS}),
    ("llama", {"llama.block_count": 2, "llama.expert_count": 8, "llama.expert_used_count": 2,
               "llama.expert_group_count": 4, "llama.expert_group_used_count": 2}),
    ("hunyuan-dense", {"hunyuan-dense.block_count": 2, "hunyuan-dense.expert_count": 1,
                       "hunyuan-dense.expert_used_count": 1}),
    ("llama", {"llama.block_count": 2, "llama.rope.scaling.type": "yarn"}),
])
def test_header_accepts_the_valid_neighbours(tmp_path, arch, kvs):
    from pyadaq import read_model_info

    read_model_info(_header_only(tmp_path / "m.gguf", arch, kvs))


def _main(argv: list[str]) -> int:
    import argparse

    if argv and argv[0] == "child":
        model, seed, start, count, report, n_models = argv[1:7]
        run_child(model, int(seed), int(start), int(count), report, int(n_models))
        return 0
    ap = argparse.ArgumentParser(description="write mutation INDEX of SEED of a tiny model")
    ap.add_argument("cmd", choices=["repro"])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("out")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
    import tiny

    kw = MODELS[a.index % len(MODELS)]
    src = tiny.make_tiny_model(Path(a.out).with_suffix(".orig.gguf"), **kw)
    data, desc = mutate(src.read_bytes(), layout(src.read_bytes()), a.seed, a.index)
    Path(a.out).write_bytes(data)
    print(f"{a.out}: {desc}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
