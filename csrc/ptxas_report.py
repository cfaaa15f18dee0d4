"""Registers / shared memory / spills of every kernel, as a markdown table, from a build log.

    M2PT_CUDA_VERBOSE=1 M2PT_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace 2>&1 | tee build.log
    python csrc/ptxas_report.py build.log

(ptxas prints only for objects that are actually recompiled: remove build/temp.* first.)
Exits 1 if any kernel has a stack frame or spills.
"""
import re, subprocess, sys
txt = open(sys.argv[1]).read().splitlines()
rows = {}
cur = arch = None; sf = None
T = {'float': 'fp32', '__half': 'fp16', '__nv_bfloat16': 'bf16'}
MATH = {'0': 'wmma16', '1': 'tf32', '2': 'ffma'}; EPI = {'0': 'forward', '1': 'dgrad', '2': 'wgrad'}
for l in txt:
    m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", l)
    if m: cur, arch = m.group(1), m.group(2); continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", l)
    if m and cur: sf = m.groups()
    m = re.search(r"Used (\d+) registers", l)
    if m and cur:
        sm = re.search(r"(\d+) bytes smem", l)
        name = subprocess.run(['c++filt', cur], capture_output=True, text=True).stdout.strip()
        name = re.sub(r"\(.*$", "", name.replace('m2pt_cuda::(anonymous namespace)::', '').replace('void ', ''))
        g = re.match(r"gemm_kernel<(\w+), (\d), (\d)>", name)
        if g: name = f"gemm_kernel<{T[g.group(1)]}, {MATH[g.group(2)]}, {EPI[g.group(3)]}>"
        g = re.match(r"(gemv_forward_kernel|gemv_dgrad_kernel|colsum_kernel)<(\w+)(.*)>", name)
        if g: name = f"{g.group(1)}<{T[g.group(2)]}{g.group(3)}>"
        rows.setdefault(name, {})[arch] = (m.group(1), sm.group(1) if sm else '0', '/'.join(sf))
        cur = None
archs = sorted({a for d in rows.values() for a in d})
print("| kernel | " + " | ".join(f"regs {a}" for a in archs) + " | static smem (B) | stack/spill-st/spill-ld |")
print("|---|" + "---|" * (len(archs) + 2))
bad = False
for name in sorted(rows):
    d = rows[name]
    regs = " | ".join(d[a][0] if a in d else "-" for a in archs)
    smem = "/".join(sorted({v[1] for v in d.values()}))
    spills = ", ".join(f"{a}: {d[a][2]}" for a in archs if a in d)
    print(f"| `{name}` | {regs} | {smem} | {spills} |")
    bad = bad or any(v[2] != "0/0/0" for v in d.values())
sys.exit(1 if bad or not rows else 0)
