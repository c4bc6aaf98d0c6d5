"""pyadaq eval against llama.cpp's own llama-perplexity, built from the same pinned source.

Runs scripts/crosscheck_perplexity.py on the embedded model for upstream cache types: the
perplexities must agree within 0.5 % and the mean KL divergences within 5 %. The tool is the
llama-perplexity installed with pyadaq (pyadaq/bin), or $PYADAQ_LLAMA_PERPLEXITY. About 4
minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.embedded

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "crosscheck_perplexity.py"


def _llama_perplexity() -> Path:
    named = os.environ.get("PYADAQ_LLAMA_PERPLEXITY")
    if named:
        path = Path(named)
        # asked for explicitly: a wrong path is an error
        assert path.is_file() and os.access(path, os.X_OK), \
            f"PYADAQ_LLAMA_PERPLEXITY={named} is not an executable"
        return path
    from pyadaq.tools import tool_path

    return tool_path("llama-perplexity")


def test_eval_agrees_with_llama_perplexity(embedded_model, tmp_path):
    binary = _llama_perplexity()
    out = tmp_path / "crosscheck.json"
    cmd = [sys.executable, str(SCRIPT), "--llama-perplexity", str(binary), "--model", str(embedded_model),
           "--ctx", "512", "--chunks", "4", "--configs", "f16:f16,q8_0:q4_0,q4_0:q4_0,q8_0:kvq2", "--json", str(out)]
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace")
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, f"cross-check failed ({proc.returncode}):\n{proc.stdout[-6000:]}"

    res = json.loads(out.read_text())
    assert res["ok"]
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"f16:f16 (base run)", "f16:f16", "q8_0:q4_0", "q4_0:q4_0", "q8_0:kvq2"}
    for name, r in rows.items():
        assert r["ppl_rel_diff"] <= 0.005, name
    for name in ("q8_0:q4_0", "q4_0:q4_0", "q8_0:kvq2"):
        r = rows[name]
        assert r["tokens"] == 4 * 255
        assert r["kl_rel_diff"] <= 0.05, name
        assert r["llama_kl"] > 1e-3, name  # a real KL, not the noise floor: the 5 % check means something
    assert abs(rows["f16:f16"]["pyadaq_kl"]) < 1e-4 and abs(rows["f16:f16"]["llama_kl"]) < 1e-4
