"""The process allocator keeps freed buffers for the next pass (minor page faults counted in a fresh process)."""

from __future__ import annotations

import sys
import textwrap

from _util import run

SCRIPT = textwrap.dedent("""
    import resource, sys, timm, torch
    from vitq.allocator import release_freed_memory, retain_freed_memory

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    if sys.argv[1] == "retain":
        assert retain_freed_memory() is True
    elif sys.argv[1] == "session":  # building a Session (what every trial of the CLI runs in) retains
        from vitq.session import Session
        Session.from_config({"device": "cpu"})
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=192, depth=2,
                              num_heads=3, num_classes=7).eval()
    x = torch.randn(512, 3, 32, 32)  # MLP activations of 100 MiB: above glibc's largest adaptive threshold
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        f0, r0 = faults(), rss()
        for _ in range(5):  # passes that free and allocate the same buffers again
            model(x)
        f1, r1 = faults(), rss()
    release_freed_memory()
    print(f1 - f0, (r1 - r0) >> 20, (r1 - rss()) >> 20)
""")
MLP_PAGES = 512 * 65 * 768 * 4 // 4096  # minor faults to touch one MLP activation afresh


def _passes(mode: str, tmp_path) -> tuple[int, int, int]:  # noqa: ANN001
    """Minor faults of five forward passes after three, the resident set's growth over them and the MiB that
    ``release_freed_memory`` hands back after them."""
    r = run([sys.executable, "-c", SCRIPT, mode], tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    faults, grown, released = r.stdout.split()
    return int(faults), int(grown), int(released)


def test_freed_buffers_are_reused_not_faulted_in_again(tmp_path):
    default, _, _ = _passes("default", tmp_path)
    retained, grown, released = _passes("retain", tmp_path)
    session, _, _ = _passes("session", tmp_path)
    assert default >= 5 * MLP_PAGES  # glibc's default: every pass maps and faults its large buffers in again
    # kept: over five passes fewer faults than one large buffer takes (the heap may settle once: 6,240 seen)
    assert retained < MLP_PAGES and session < MLP_PAGES
    assert grown < 50  # (MiB) without growing: the kept heap is reused, not added to
    assert released >= 100  # and release_freed_memory hands the kept heap back (the bench's peak memory)
