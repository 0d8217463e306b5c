import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "adapter_step_size.py"


def test_step_sizes_on_tiny_bert(tmp_path, monkeypatch):
    out = tmp_path / "steps.md"
    argv = ["adapter_step_size.py", "--budget", "3.0", "--cache-dir", str(tmp_path / "cache")]
    argv += ["--out", str(out), "model=tiny_bert", f"paths.data_dir={ROOT / 'tests' / 'fixtures'}"]
    argv += ["data.allow_hub=false", "data.batch_size=8", "quant.space.bits=[2,3,4]"]
    argv += ["quant.space.bits0=[8]", "quant.space.dtype1=[fp32]", "quant.space.block1=[256]"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells and cells[0] in ("qlora", "lq_lora", "qwha"):
            rows[cells[0]] = cells
    assert set(rows) == {"qlora", "lq_lora", "qwha"}
    # LoRA starts at B = 0: no update yet, and the first step moves ΔW through B only
    assert float(rows["qlora"][3]) == 0.0 and float(rows["qlora"][4]) == 0.0
    assert float(rows["qlora"][5]) > 0
    # LQ-LoRA starts at s·B·A = L1 L2 (non-zero; both factors move). On pretrained MiniLM its
    # step is 4x QLoRA's (docs/benchmarks.md); tiny random weights have no such spectrum.
    assert float(rows["lq_lora"][2]) > 0 and float(rows["lq_lora"][3]) > 0
    assert float(rows["lq_lora"][4]) > 0 and float(rows["lq_lora"][5]) > 0
    assert rows["qwha"][2] == "—" and float(rows["qwha"][4]) > 0
