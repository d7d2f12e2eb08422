#!/usr/bin/env python3
"""The summary and the limits of `tools/gpu-check.sh` (stdlib only: it runs before anything is
installed, under the GPU machine's python3 and the rehearsal's alike).

  check_summary.py init SUMMARY --mode M [--key value ...]
      starts SUMMARY (JSON) with the run's facts
  check_summary.py step SUMMARY NAME --status S --seconds T [--result FILE] [--mem FILE] [--note TEXT]
                  [--timeout T]
      records one step (ok | timeout | failed (exit N) | cannot start (exit N) | skipped), with
      the figures of its result file condensed and its process's peaks (gpumem.py --json), and
      rewrites SUMMARY atomically; `rewrites` counts the rewrites
  check_summary.py set SUMMARY KEY JSON
      sets one top-level key
  check_summary.py out-check OUT [--files 8] [--depth 2] [--file-mib 16]
      what the device machine would not bring back from OUT: more than 8 files, a file more
      than 2 folders down, a file over 16 MiB, a link, a name of other characters than letters,
      digits, '.', '_' and '-'; prints one JSON line, exits 1 if anything
  check_summary.py tree-size ROOT [--extra PATH ...] [--limit-mib 64]
      the size of what travels to the device machine: git's tracked and untracked-not-ignored
      files of ROOT (every file under ROOT where ROOT is no git checkout, as on the GPU machine)
      plus the carried paths; exits 1 over the limit
  check_summary.py print SUMMARY
      the summary on one line (the check's last stdout line)
"""

import json
import os
import re
import subprocess
import sys
import time

MIB = 1024 * 1024
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


def load(path):
    with open(path) as f:
        return json.load(f)


def save(path, summary):
    summary["rewrites"] = summary.get("rewrites", 0) + 1
    summary["updated"] = round(time.time(), 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, separators=(",", ":"))
    os.replace(tmp, path)


def sig(x, n=4):
    """`x` to `n` significant digits (floats only), so the one-line summary stays short."""
    if isinstance(x, float):
        return float(f"{x:.{n}g}")
    return x


def condense(name, data):
    """The figures of a step's result file that go into the summary."""
    if not isinstance(data, dict):
        return data
    if "checks" in data:  # gpu_check parity
        return {
            "device": data.get("device"),
            "tf32_override": data.get("tf32_override"),
            "failed": data.get("failed"),
            "checks": {k: (sig(v["value"], 3) if "value" in v else v.get("error", "?")[:200])
                       for k, v in data["checks"].items()},
            "check_s": {k: v.get("s") for k, v in data["checks"].items()},
        }
    if "results" in data and "batches" in data:  # unet.py
        keep = ("torch_median_s", "candle_median_s", "ratio", "torch_gpu_peak_mib", "candle_gpu_peak_mib",
                "torch_alloc_peak_mib", "torch_host_peak_mib", "candle_host_peak_mib")
        return {
            "dtype": data.get("dtype"), "size": data.get("size"), "tf32": data.get("tf32"),
            "gpu_memory": data.get("gpu_memory"), "errors": data.get("errors"),
            "results": {k: {kk: sig(v.get(kk)) for kk in keep if kk in v} for k, v in data["results"].items()},
        }
    if "runs" in data:  # pipeline.py
        out = {k: data.get(k) for k in ("size", "steps", "dtype", "tf32", "gpu_memory", "errors",
                                        "ratio_process", "ratio_sampling")}
        for side, rs in data["runs"].items():
            if rs:
                r = rs[-1]
                out[side] = {k: sig(v) for k, v in r.items() if k not in ("tf32",)}
        return out
    return data


def cmd_init(args):
    path, rest = args[0], args[1:]
    summary = {"check": "tools/gpu-check.sh", "started": round(time.time(), 1), "steps": {}, "rewrites": 0}
    it = iter(rest)
    for k in it:
        summary[k.lstrip("-")] = next(it)
    save(path, summary)


def cmd_step(args):
    path, name, rest = args[0], args[1], args[2:]
    opts = dict(zip(rest[::2], rest[1::2]))
    summary = load(path)
    entry = {"status": opts.get("--status", "?"), "s": sig(float(opts.get("--seconds", "nan")), 3)}
    if "--timeout" in opts:
        entry["timeout_s"] = int(float(opts["--timeout"]))
    if opts.get("--note"):
        entry["note"] = opts["--note"][-600:]
    mem = opts.get("--mem")
    if mem and os.path.exists(mem):
        try:
            m = load(mem)
            entry["peak"] = {"gpu_mib": m.get("gpu_peak_mib"), "host_mib": m.get("host_peak_mib"),
                             "gpu_memory": m.get("gpu_memory")}
        except (ValueError, OSError):
            pass
    res = opts.get("--result")
    if res:
        try:
            entry["result"] = condense(name, load(res))
        except FileNotFoundError:
            entry["result"] = None
        except (ValueError, OSError) as e:
            entry["result"] = f"unreadable {res}: {e}"
    summary["steps"][name] = entry
    summary["elapsed_s"] = round(time.time() - summary["started"], 1)
    save(path, summary)


def cmd_set(args):
    path, key, value = args
    summary = load(path)
    summary[key] = json.loads(value)
    save(path, summary)


def cmd_out_check(args):
    out = args[0]
    opts = dict(zip(args[1::2], args[2::2]))
    max_files, max_depth = int(opts.get("--files", 8)), int(opts.get("--depth", 2))
    max_bytes = float(opts.get("--file-mib", 16)) * MIB
    problems, files = [], []
    for d, dirs, fs in os.walk(out):
        rel = os.path.relpath(d, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for x in dirs + fs:
            p = os.path.join(d, x)
            if not NAME_OK.match(x):
                problems.append(f"name {os.path.relpath(p, out)!r} has other characters than [A-Za-z0-9._-]")
            if os.path.islink(p):
                problems.append(f"{os.path.relpath(p, out)} is a link")
        for x in fs:
            p = os.path.join(d, x)
            files.append(p)
            if depth > max_depth:
                problems.append(f"{os.path.relpath(p, out)} is {depth} folders down (at most {max_depth})")
            if os.path.isfile(p) and os.path.getsize(p) > max_bytes:
                problems.append(f"{os.path.relpath(p, out)} is {os.path.getsize(p) / MIB:.1f} MiB "
                                f"(at most {max_bytes / MIB:.0f})")
    if len(files) > max_files:
        problems.append(f"{len(files)} files (at most {max_files})")
    print(json.dumps({"files": len(files), "bytes": sum(os.path.getsize(p) for p in files if os.path.isfile(p)),
                      "problems": problems}))
    sys.exit(1 if problems else 0)


def du(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f)))


def cmd_tree_size(args):
    root = args[0]
    extra, limit = [], 64.0
    it = iter(args[1:])
    for k in it:
        if k == "--extra":
            extra.append(next(it))
        elif k == "--limit-mib":
            limit = float(next(it))
    if os.path.exists(os.path.join(root, ".git")):
        ls = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.split(b"\0")
        tree = sum(os.path.getsize(os.path.join(root, p.decode())) for p in ls
                   if p and os.path.isfile(os.path.join(root, p.decode())))
        how = "git: tracked + untracked-not-ignored"
    else:
        skip = {os.path.normpath(os.path.join(root, e)) for e in extra}
        tree = 0
        for d, dirs, fs in os.walk(root):
            dirs[:] = [x for x in dirs if os.path.normpath(os.path.join(d, x)) not in skip]
            tree += sum(os.path.getsize(os.path.join(d, f)) for f in fs if not os.path.islink(os.path.join(d, f)))
        how = "every file under the root (no git checkout)"
    carried = {e: du(os.path.join(root, e)) for e in extra if os.path.exists(os.path.join(root, e))}
    total = tree + sum(carried.values())
    print(json.dumps({"tree_mib": round(tree / MIB, 2), "carried_mib": {k: round(v / MIB, 2) for k, v in carried.items()},
                      "total_mib": round(total / MIB, 2), "limit_mib": limit, "how": how,
                      "ok": total <= limit * MIB}))
    sys.exit(0 if total <= limit * MIB else 1)


def cmd_print(args):
    print(json.dumps(load(args[0]), separators=(",", ":")))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"init": cmd_init, "step": cmd_step, "set": cmd_set, "out-check": cmd_out_check,
     "tree-size": cmd_tree_size, "print": cmd_print}[cmd](args)


if __name__ == "__main__":
    main()
