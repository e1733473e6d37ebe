"""`pip wheel --no-build-isolation .` gives a wheel that installs into a fresh venv
(--no-deps, beside the same torch) and passes a smoke test there."""
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_wheel_builds_installs_and_runs(tmp_path):
    wheel_dir = tmp_path / "wheels"
    # setup.py keeps objects in ./build/temp, so this reuses the editable build's objects.
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
          str(wheel_dir), str(REPO)], cwd=REPO, timeout=1200)
    wheels = list(wheel_dir.glob("dmlkern-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    vpy = venv / "bin" / "python"
    # "Beside the same torch": expose this venv's site-packages (torch, numpy) to the new one
    # as a plain path; .pth files there (our editable install) are not processed.
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "outer_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])], timeout=600)

    smoke = textwrap.dedent("""
        import torch, dmlkern
        from pathlib import Path
        assert Path(dmlkern.__file__).is_relative_to(Path(r"%s")), dmlkern.__file__
        info = dmlkern.build_info()
        assert info["extension_loaded"] and info["cpu"], info
        from dmlkern.ops import masked_lse
        from dmlkern import reference
        x = torch.randn(50, 9, dtype=torch.float64)
        lab = torch.randint(0, 3, (50,))
        got = masked_lse(x, None, lab, scale=2.0, mask="diff", backend="cpp")
        want = reference.masked_lse(x, x, lab, lab, 2.0, "diff", True)
        torch.testing.assert_close(got, want)
        import dmlkern.losses, dmlkern.miners
        print("wheel ok", info["cuda"], info["cuda_arch_list"])
    """ % venv)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run([str(vpy), "-c", smoke], cwd=tmp_path, env=env, timeout=300)
    assert "wheel ok" in out
