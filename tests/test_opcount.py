"""The op counter and the host-sync guard (personaplex.opcount)."""

from __future__ import annotations

import pytest
import torch

from personaplex.opcount import HostSyncError, NoHostSync, OpCounter, count_ops


def test_count_ops_counts_compute_not_views():
    x = torch.randn(4, 6)
    w = torch.randn(6, 3)

    def fn():
        y = x.view(2, 12).transpose(0, 1).transpose(0, 1).reshape(4, 6)  # views only
        z = y @ w  # one mm
        z.add_(1.0)  # one in-place add
        return torch.cat([z, z]).sum()  # cat + sum

    counts = count_ops(fn)
    assert counts["aten.mm"] == 1 and counts["aten.add_"] == 1 and counts["aten.cat"] == 1
    assert counts["aten.sum"] == 1
    assert not any(k in counts for k in ("aten.view", "aten.transpose", "aten.t"))
    assert sum(counts.values()) == 4
    with_views = count_ops(fn, include_views=True)
    assert with_views["aten.view"] >= 1 and sum(with_views.values()) > 4


def test_count_ops_on_meta_and_bytes_out():
    x = torch.empty(8, 16, device="meta")
    with OpCounter() as counter:
        y = x * 2  # 8*16*4 bytes materialised
        y.mul_(3)  # in place: nothing new
    assert sum(counter.counts.values()) == 2
    assert counter.bytes_out == 8 * 16 * 4


@pytest.mark.parametrize(
    "bad",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.sum() > 0),
        lambda t: int(t.sum()),
        lambda t: t.cpu(),
        lambda t: t.to("cpu"),
        lambda t: torch.zeros(3).copy_(t),
        lambda t: t.nonzero(),
        lambda t: t[t > 0],
        lambda t: torch.equal(t, t),
    ],
)
def test_no_host_sync_raises(bad):
    t = torch.empty(3, device="meta")
    with pytest.raises(HostSyncError, match="host synchronisation"):
        with NoHostSync():
            bad(t)


def test_no_host_sync_allows_device_work():
    t = torch.empty(3, 4, device="meta")
    buf = torch.empty(3, 4, device="meta")
    with NoHostSync():
        buf.copy_(t * 2)
        torch.where(t > 0, t, buf).softmax(-1)
        torch.zeros(3, 4).to("meta")  # host to device is fine
    with NoHostSync(allow_dynamic_shapes=True), pytest.raises(NotImplementedError):
        t.nonzero()  # allowed by the guard; the meta device itself cannot do it


def test_counts_and_checks_do_not_depend_on_inference_mode():
    x, w = torch.randn(4, 6), torch.randn(6, 3)

    def fn():
        y = torch.nn.functional.linear(x, w.t()).to(torch.float32).contiguous()  # mm; the to/contiguous are no-ops
        return torch.nn.functional.layer_norm(y, (3,))

    plain = count_ops(fn)
    assert plain == {"aten.mm": 1, "aten.native_layer_norm": 1}
    with torch.inference_mode():
        assert count_ops(fn) == plain
        with pytest.raises(HostSyncError), NoHostSync():
            torch.empty(3, device="meta").cpu()


def test_attention_counts_as_one_kernel_in_any_grad_mode():
    q = torch.randn(2, 4, 3, 8)
    mask = torch.zeros(2, 1, 3, 3)

    def fn():
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask).mul(2)

    expected = {"aten.scaled_dot_product_attention": 1, "aten.mul": 1}
    assert count_ops(fn) == expected
    with torch.no_grad():
        assert count_ops(fn) == expected
    with torch.inference_mode():
        assert count_ops(fn) == expected
