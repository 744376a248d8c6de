"""Static figures of the pack's Triton kernels as the H100 (or another NVIDIA card) would run them, on any machine.

Why: a kernel between the UNet's convolutions is worth its bytes only if it can keep up with the memory, and
that can be read off its machine code without a GPU. Triton ships the compiler chain for NVIDIA cards (ptxas,
nvdisasm), so each kernel is compiled here for sm_90 (or any card in :data:`CARDS`) the way the JIT would specialise
it at run time (pointers and sizes divisible by 16, unit channel strides as constants: channels_last
activations), and then:

* ptxas reports its registers and any spills to local memory;
* the SASS gives the instructions per element each thread executes, and the barriers inside its loops. An H100
  SXM issues about 31 T thread-instructions per second against 3.35 TB/s of memory: a kernel that executes
  more than about 9 instructions per byte it moves is bound by its arithmetic, not its memory, and a barrier
  inside a reduction loop stalls every warp of the program once per tile.

``scripts/kernel_report.py`` prints the table; ``tests/test_triton_norm.py`` holds every kernel to compiling
without spills for every card family from Turing to Blackwell, and to reduction loops without barriers.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CARDS", "KernelCase", "kernel_cases", "cuda_target", "compile_for", "ptxas_figures", "sass_figures",
           "report_rows"]

_NUM_WARPS = 4  # Triton's default, which the pack's launches keep
_ALIGNED_INTS = ("HW", "C", "PC", "G", "n", "D", "rows_per_split", "rows_per_program", "stride_b", "stride_hw") + tuple(
    f"{t}_{d}" for t in ("sx", "sd", "sy", "so", "sr", "sh") for d in ("b", "hw"))


# The NVIDIA card families Triton compiles for, by compute capability: the kernels must build, without spills, for
# every card a user might bring (``tests/test_triton_norm.py``), not only the H100 the figures are read for.
CARDS = {75: "Turing: T4, RTX 20xx", 80: "Ampere: A100, A30", 86: "Ampere: RTX 30xx, A10, A40",
         89: "Ada: RTX 40xx, L4, L40", 90: "Hopper: H100, H200", 100: "Blackwell: B200", 120: "Blackwell: RTX 50xx"}


@dataclass(frozen=True)
class KernelCase:
    """One kernel in one specialisation: its module, name, activation dtype and compile-time constants."""

    module: str
    kernel: str
    dtype: str  # Triton's name: bf16, fp16, fp32
    constexprs: dict = field(default_factory=dict)
    activations: tuple = ()  # pointer arguments in the activation dtype; other pointers are float32
    bytes_per_element: float = 0  # bytes each element of the tile costs the kernel in memory traffic

    @property
    def label(self) -> str:
        flags = "+".join(k.lower().removeprefix("has_") for k, v in self.constexprs.items() if v is True)
        return f"{self.kernel}[{self.dtype}{'+' + flags if flags else ''}]"

    def elements_per_thread(self) -> int:
        """Tile elements per thread per program (or per loop iteration, for the split reductions and merges)."""
        c = self.constexprs
        block = c.get("BLOCK") or c.get("BLOCK_D") or c.get("BLOCK_R", 0) * c.get("BLOCK_S", 0) or (
            c["BLOCK_HW"] * c["BLOCK_C"])
        return block // (32 * _NUM_WARPS)


_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def kernel_cases(dtypes=("bf16", "fp32")) -> list[KernelCase]:
    """Every Triton kernel of ``triton_norm`` and ``triton_residual`` (channels_last, a ViT-B/16 row for
    ``triton_clip``) with the tile sizes the pack launches it with, in each dtype, with and without its optional
    terms."""
    from .triton_clip import GELU_BLOCK
    from .triton_norm import AFFINE_BACKWARD_TILE, BACKWARD_TILE, FORWARD_TILE, HALVING_TILE, MERGE_TILE, REDUCTION_TILE

    def tile(block_hw_and_c):
        return dict(zip(("BLOCK_HW", "BLOCK_C"), block_hw_and_c, strict=True))

    reduction = tile(REDUCTION_TILE[True])  # channels_last: the channels are the contiguous axis
    row = {"BLOCK_D": 1024}  # ViT-B's 768-wide tokens, padded to a power of two
    merge = dict(zip(("BLOCK_R", "BLOCK_S"), MERGE_TILE, strict=True))
    # The merges of the split reductions' float32 partial sums, whatever the activations' dtype.
    # The statistics' merge takes a map's partial sums as one part or two (an output block's running map and
    # skip, each with its own).
    cases = [*(KernelCase("triton_norm", "_stats_merge_kernel", "fp32", {**merge, "TWO_PARTS": two}, (), 12)
               for two in (False, True)),
             KernelCase("triton_norm", "_backward_stats_merge_kernel", "fp32", merge, (), 8)]
    for dtype in dtypes:
        size = _ITEMSIZE[dtype]
        # The pointers a run clone's convolution biases reach (stored in the activations' dtype) as input biases.
        for input_bias in (False, True):
            cases.append(KernelCase("triton_norm", "_stats_kernel", dtype, {**reduction, "HAS_INPUT_BIAS": input_bias},
                                    ("x_ptr", "ib_ptr"), size))
        # A ResBlock's second norm has the timestep terms and its convolution's bias, the others neither; a down
        # ResBlock's first norm pools its output and its input (HALVING): it reads 4 pixels of x for each it
        # writes of the two, and its backward reads each half-size gradient once for 4 pixels of x.
        # An attention block's norm has no SiLU (AFFINE_ONLY) and always its residual's gradient to add.
        for terms in ({"HAS_SCALE_SHIFT": True, "HAS_INPUT_BIAS": True, "HALVING": False, "AFFINE_ONLY": False},
                      {"HAS_SCALE_SHIFT": False, "HAS_INPUT_BIAS": False, "HALVING": False, "AFFINE_ONLY": False},
                      {"HAS_SCALE_SHIFT": False, "HAS_INPUT_BIAS": False, "HALVING": True, "AFFINE_ONLY": False},
                      {"HAS_SCALE_SHIFT": False, "HAS_INPUT_BIAS": False, "HALVING": False, "AFFINE_ONLY": True}):
            halving = terms["HALVING"]
            cases.append(KernelCase("triton_norm", "_forward_kernel", dtype,
                                    {**tile(HALVING_TILE if halving else FORWARD_TILE), **terms},
                                    ("x_ptr", "y_ptr", "xh_ptr", "ib_ptr"), (6 if halving else 2) * size))
            gradient = 0.25 if halving else 1  # bytes of the output's gradient per element of x, in units of size
            cases.append(KernelCase("triton_norm", "_backward_stats_kernel", dtype, {**reduction, **terms},
                                    ("x_ptr", "dy_ptr", "ib_ptr"), (1 + gradient) * size))
            # No other gradient to add, the skip path's, or (an encoder block's input) the skip stack's too; a
            # down block's input always has its skip path's.
            for residuals in (2, 1) if halving else (1,) if terms["AFFINE_ONLY"] else (2, 1, 0):
                pointers = ("x_ptr", "dy_ptr", "dx_ptr", "r_ptr", "r2_ptr", "ib_ptr")
                cases.append(KernelCase("triton_norm", "_backward_kernel", dtype,
                                        {**tile(AFFINE_BACKWARD_TILE if terms["AFFINE_ONLY"] else BACKWARD_TILE),
                                         **terms, "HAS_RESIDUAL": residuals > 0,
                                         "HAS_SECOND_RESIDUAL": residuals > 1}, pointers,
                                        (2 + gradient * (1 + (residuals > 0)) + (residuals > 1)) * size))
        # An up block's skip is read at half size, once for 4 pixels of the output. The kernel loops over a split
        # of the pixels as the statistics pass does, for the partial statistics it leaves.
        for upsampled_skip in (False, True):
            cases.append(KernelCase("triton_residual", "_residual_sum_kernel", dtype,
                                    {**reduction, "UPSAMPLED_SKIP": upsampled_skip},
                                    ("s_ptr", "h_ptr", "out_ptr", "bias_ptr"), (2.25 if upsampled_skip else 3) * size))
        gelu = {"BLOCK": GELU_BLOCK}
        cases.append(KernelCase("triton_clip", "_gelu_forward_kernel", dtype, gelu, ("x_ptr", "y_ptr"), 2 * size))
        cases.append(KernelCase("triton_clip", "_gelu_backward_kernel", dtype, gelu, ("x_ptr", "dy_ptr", "dx_ptr"),
                                3 * size))
        # With a residual the forward also reads it and writes the sum, and the backward reads the sum's gradient.
        for residual in (False, True):
            cases.append(KernelCase("triton_clip", "_norm_forward_kernel", dtype, {**row, "HAS_RESIDUAL": residual},
                                    ("x_ptr", "r_ptr", "s_ptr", "y_ptr"), (4 if residual else 2) * size))
            cases.append(KernelCase("triton_clip", "_norm_backward_kernel", dtype, {**row, "HAS_RESIDUAL": residual},
                                    ("x_ptr", "dy_ptr", "r_ptr", "dx_ptr"), (4 if residual else 3) * size))
    return cases


def _jit_function(case: KernelCase):
    import importlib

    return getattr(importlib.import_module(f"blended.{case.module}"), case.kernel)


def cuda_target(capability: int = 90):
    """Triton's compile target for an NVIDIA card of this compute capability (90: the H100), 32 threads a warp."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", capability, 32)


def compile_for(case: KernelCase, capability: int = 90):
    """The kernel compiled for ``sm_<capability>``, specialised as Triton's JIT would for channels_last
    activations."""
    import triton
    from triton.compiler import ASTSource

    fn = _jit_function(case)
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = dict(case.constexprs)
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{case.kernel}: no value given for its constants {', '.join(missing)}")
    for name in names:
        if name not in constexprs and (name.endswith("_c") or name == "stride_c"):  # channels_last: stride 1
            constexprs[name] = 1
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{case.dtype}" if name in case.activations else "*fp32"
        else:
            signature[name] = "fp32" if name in ("eps", "count") else "i32"
    aligned = [i for i, name in enumerate(names)
               if signature[name] != "constexpr" and (name.endswith("_ptr") or name in _ALIGNED_INTS)]
    return triton.compile(_source(ASTSource, fn, signature, constexprs, aligned), target=cuda_target(capability))


def _source(ast_source, fn, signature: dict, constexprs: dict, aligned: list[int]):
    """The kernel's source for ``triton.compile``, in the form the installed Triton takes: 3.3 and newer; 3.2
    (torch 2.6) and 3.0 to 3.1 (torch 2.4 and 2.5) named the constants and the alignment hints otherwise, and the
    older two keyed the arguments by position."""
    if "constexprs" in inspect.signature(ast_source).parameters:
        return ast_source(fn=fn, signature=signature, constexprs=constexprs,
                          attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    try:
        from triton.backends.compiler import AttrsDescriptor
    except ImportError:
        from triton.compiler.compiler import AttrsDescriptor

        names = list(signature)
        return ast_source(fn=fn, signature={i: t for i, t in enumerate(signature.values()) if t != "constexpr"},
                          constants={names.index(n): v for n, v in constexprs.items()},
                          attrs=AttrsDescriptor(divisible_by_16=set(aligned)))
    attrs = AttrsDescriptor.from_dict({"cls": AttrsDescriptor.__name__, "arg_properties": {"tt.divisibility": aligned}})
    return ast_source(fn=fn, signature=signature, constants=constexprs, attrs=attrs)


def _nvidia_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _ptxas(capability: int) -> str:
    """The ptxas Triton itself assembles this card's code with (it ships a second one for Blackwell)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:  # Triton 3.2 and older: the one it ships
        return str(_nvidia_tool("ptxas"))
    # Triton 3.6 and newer take the card; 3.4 and 3.5 ship one ptxas for all; 3.3 returns (path, version).
    found = get_ptxas(capability) if inspect.signature(get_ptxas).parameters else get_ptxas()
    return found.path if hasattr(found, "path") else found[0]


def ptxas_figures(compiled) -> dict:
    """Registers per thread and bytes spilled to local memory, by the ptxas Triton ships (``ptxas -v``)."""
    ptx = compiled.asm["ptx"]
    target = ptx.split(".target", 1)[1].split()[0]  # sm_90a
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run([_ptxas(compiled.metadata.target.arch), "-v", "--gpu-name", target, str(path),
                               "-o", str(Path(work) / "kernel.cubin")], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr}")
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return {"registers": int(registers.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
            "ptxas": done.stderr}


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;")


def sass_figures(compiled) -> dict:
    """The SASS's instruction count and, for each loop (a branch back to an earlier label), its body's
    instructions and barriers."""
    with tempfile.TemporaryDirectory() as work:
        cubin = Path(work) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        done = subprocess.run([str(_nvidia_tool("nvdisasm")), "-c", str(cubin)], capture_output=True, text=True,
                              timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {done.stderr}")
    labels, instructions, loops = {}, [], []
    for line in done.stdout.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        instructions.append(found.group(1))
        branch = re.search(r"\bBRA\b.*?(\.L_x_\d+)", found.group(1))
        if branch and branch.group(1) in labels and labels[branch.group(1)] < len(instructions) - 1:
            body = instructions[labels[branch.group(1)]:]
            loops.append({"instructions": len(body), "barriers": sum(" BAR." in f" {i}" for i in body)})
    return {"instructions": len(instructions), "loops": loops}


def report_rows(cases=None, capability: int = 90) -> list[dict]:
    """One row per case: registers, spills, SASS instructions per element (of the loop body where the kernel
    loops over its tile, of the whole kernel otherwise), instructions per byte moved, barriers in loops."""
    rows = []
    for case in cases or kernel_cases():
        compiled = compile_for(case, capability)
        ptxas, sass = ptxas_figures(compiled), sass_figures(compiled)
        loops = sass["loops"]
        executed = loops[0]["instructions"] if loops else sass["instructions"]
        per_element = executed / case.elements_per_thread()
        rows.append({"kernel": case.label, "registers": ptxas["registers"], "spill_bytes": ptxas["spill_bytes"],
                     "sass_instructions": sass["instructions"], "loop_instructions": [x["instructions"] for x in loops],
                     "loop_barriers": sum(x["barriers"] for x in loops),
                     "instructions_per_element": round(per_element, 1),
                     "instructions_per_byte": round(per_element / case.bytes_per_element, 1)})
    return rows
