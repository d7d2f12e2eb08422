#!/usr/bin/env python3
"""Tests of check_summary.py, the limits the GPU check's rehearsal enforces (stdlib only):
python3 tools/bench/test_check_summary.py"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "check_summary.py")


def tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)


def touch(path, size=10):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


class OutCheck(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.out = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def check(self):
        r = tool("out-check", self.out)
        return r.returncode, json.loads(r.stdout)

    def test_eight_small_files_two_folders_down_come_back(self):
        for i in range(6):
            touch(os.path.join(self.out, f"f{i}.json"))
        touch(os.path.join(self.out, "a", "b", "deep.txt"))
        touch(os.path.join(self.out, "a", "x.txt"))
        rc, r = self.check()
        self.assertEqual((rc, r["files"], r["problems"]), (0, 8, []))

    def test_a_ninth_file_fails(self):
        for i in range(9):
            touch(os.path.join(self.out, f"f{i}.json"))
        rc, r = self.check()
        self.assertEqual(rc, 1)
        self.assertIn("9 files (at most 8)", r["problems"])

    def test_three_folders_down_fails(self):
        touch(os.path.join(self.out, "a", "b", "c", "file"))
        rc, r = self.check()
        self.assertEqual(rc, 1)
        self.assertTrue(any("3 folders down" in p for p in r["problems"]), r)

    def test_a_file_over_16_mib_fails(self):
        touch(os.path.join(self.out, "big.bin"), 16 * 1024 * 1024 + 1)
        touch(os.path.join(self.out, "ok.bin"), 16 * 1024 * 1024)
        rc, r = self.check()
        self.assertEqual(rc, 1)
        self.assertEqual(len(r["problems"]), 1, r)
        self.assertIn("big.bin", r["problems"][0])

    def test_odd_names_and_links_fail(self):
        touch(os.path.join(self.out, "a file.txt"))
        os.symlink("a file.txt", os.path.join(self.out, "link"))
        rc, r = self.check()
        self.assertEqual(rc, 1)
        self.assertTrue(any("other characters" in p for p in r["problems"]), r)
        self.assertTrue(any("is a link" in p for p in r["problems"]), r)


class TreeSize(unittest.TestCase):
    def test_the_limit_counts_the_tree_and_the_carried_folder(self):
        with tempfile.TemporaryDirectory() as root:
            touch(os.path.join(root, "src", "a"), 3 * 1024 * 1024)
            touch(os.path.join(root, "gpu-bundle", "b"), 2 * 1024 * 1024)
            r = tool("tree-size", root, "--extra", "gpu-bundle", "--limit-mib", "5")
            self.assertEqual(r.returncode, 0, r.stdout)
            self.assertEqual(json.loads(r.stdout)["total_mib"], 5.0)
            r = tool("tree-size", root, "--extra", "gpu-bundle", "--limit-mib", "4.9")
            self.assertEqual(r.returncode, 1, r.stdout)


class Summary(unittest.TestCase):
    def test_every_step_rewrites_and_condenses(self):
        with tempfile.TemporaryDirectory() as d:
            s = os.path.join(d, "summary.json")
            self.assertEqual(tool("init", s, "--mode", "rehearse").returncode, 0)
            parity = os.path.join(d, "parity.json")
            with open(parity, "w") as f:
                json.dump({"device": "cuda:0", "failed": ["x"], "checks": {
                    "x": {"value": 0.123456789, "bound": 1e-4, "ok": False, "s": 1.5}}}, f)
            self.assertEqual(tool("step", s, "a_parity", "--status", "failed (exit 1)", "--seconds", "3",
                                  "--result", parity).returncode, 0)
            with open(s) as f:
                got = json.load(f)
            self.assertEqual(got["rewrites"], 2)
            self.assertEqual(got["steps"]["a_parity"]["result"]["checks"], {"x": 0.123})
            self.assertEqual(got["steps"]["a_parity"]["result"]["failed"], ["x"])
            # A missing result file is recorded as such, not an error of the summary.
            self.assertEqual(tool("step", s, "c_unet", "--status", "timeout", "--seconds", "75",
                                  "--result", os.path.join(d, "none.json")).returncode, 0)
            line = tool("print", s).stdout.strip().splitlines()
            self.assertEqual(len(line), 1)
            got = json.loads(line[0])
            self.assertEqual((got["rewrites"], got["steps"]["c_unet"]["result"]), (3, None))


if __name__ == "__main__":
    unittest.main()
