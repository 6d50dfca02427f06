"""avepipe.heads.dropout: F.dropout's values with fast, seeded, thread-count-independent masks."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from avepipe.heads import build
from avepipe.heads import dropout as D


@pytest.mark.parametrize("relu", [False, True])
def test_values_and_gradients_equal_f_dropout_given_the_same_mask(relu, monkeypatch):
    """With torch's own mask stream, dropout / relu_dropout give F.dropout's values and
    gradients exactly (train mode), and identity / relu in eval mode."""
    monkeypatch.setattr(D, "keep_mask", D.torch_keep_mask)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 49, 32, generator=g)
    up = torch.randn(6, 49, 32, generator=g)
    fast = D.relu_dropout if relu else D.dropout
    plain = (lambda t, p, tr: F.dropout(F.relu(t), p, tr)) if relu else F.dropout
    res = []
    for fn in (fast, plain):
        x = h.clone().requires_grad_()
        torch.manual_seed(11)
        y = fn(x, 0.2, True)
        (y * up).sum().backward()
        res.append((y.detach(), x.grad))
    (y1, g1), (y2, g2) = res
    assert 0.1 < (y2 == 0).float().mean() < 0.7  # dropout did drop something
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    torch.testing.assert_close(fast(h, 0.2, False), plain(h, 0.2, False), rtol=0, atol=0)


def test_cpu_mask_rate_seeding_and_values():
    shape = (40, 49, 512)                     # ~1M elements: the numpy path, several blocks
    assert torch.Size(shape).numel() > D._SMALL
    for p in (0.1, 0.2, 0.5):
        torch.manual_seed(0)
        m = D.keep_mask(torch.empty(shape), p)
        assert m.dtype == torch.bool and m.shape == shape
        # binomial std at n=1M is < 5e-4: 3e-3 is > 6 sigma
        assert abs(m.float().mean().item() - (1 - p)) < 3e-3
    torch.manual_seed(5)
    a, b = D.keep_mask(torch.empty(shape), 0.2), D.keep_mask(torch.empty(shape), 0.2)
    torch.manual_seed(5)
    a2 = D.keep_mask(torch.empty(shape), 0.2)
    assert torch.equal(a, a2)                 # torch.manual_seed fixes the mask
    assert not torch.equal(a, b)              # consecutive draws differ
    # blocks are independent streams, not copies of one
    blk = D.BLOCK
    flat = a.reshape(-1)
    assert not torch.equal(flat[:blk // 4], flat[blk:blk + blk // 4])
    x = torch.randn(shape)
    torch.manual_seed(5)
    y = D.dropout(x, 0.2, True)
    torch.testing.assert_close(y, torch.where(a, x / 0.8, torch.zeros(())), rtol=1e-6, atol=0)


def test_cpu_mask_does_not_depend_on_the_thread_pool(monkeypatch):
    shape = (3 * D.BLOCK + 17,)
    masks = []
    for workers in (1, 3):
        monkeypatch.setattr(D, "_pool", ThreadPoolExecutor(workers))
        torch.manual_seed(1)
        masks.append(D.keep_mask(torch.empty(shape), 0.3))
    assert torch.equal(*masks)


def test_module_has_no_state_and_p_edge_cases():
    m = D.Dropout(0.3)
    assert m.state_dict() == {} and m.p == 0.3
    x = torch.randn(4, 8)
    assert torch.equal(m.eval()(x), x)
    assert torch.equal(D.dropout(x, 1.0, True), torch.zeros_like(x))
    assert torch.equal(D.dropout(x, 0.0, True), x)
    with pytest.raises(ValueError, match="inplace"):
        D.Dropout(0.1, inplace=True).train()(x)


@pytest.mark.parametrize("head", ["cace_net", "event_memory"])
def test_training_step_equals_the_plain_dropout_model(head, monkeypatch):
    """Whole head in train mode: outputs, loss and every parameter gradient equal those of the
    same model with F.dropout / F.relu everywhere, when both draw torch's mask stream."""
    B, T = 3, 10
    g = torch.Generator().manual_seed(0)
    visual, audio = torch.randn(B, T, 7, 7, 64, generator=g), torch.randn(B, T, 16, generator=g)
    cls = torch.randint(0, 28, (B, T), generator=g)
    cls[:, :3] = 28
    seg = F.one_hot(cls, 29).float()
    batch = {"visual": visual, "audio": audio, "segment_labels": seg,
             "event_mask": (cls < 28).float(),
             "video_label": torch.cat([seg[..., :28].amax(1), torch.zeros(B, 1)], 1),
             "index": torch.arange(B)}

    def run():
        torch.manual_seed(0)
        model = build(head, (7, 7, 64), 16, "full")
        model.train()
        torch.manual_seed(5)
        out = model(batch["visual"], batch["audio"])
        loss, _ = model.loss(out, batch, 100, 200)
        loss.backward()
        return out, loss, {n: p.grad for n, p in model.named_parameters()}

    monkeypatch.setattr(D, "keep_mask", D.torch_keep_mask)
    fast = run()
    monkeypatch.setattr(D, "dropout", lambda x, p, tr: F.dropout(x, p, tr))
    monkeypatch.setattr(D, "relu_dropout", lambda h, p, tr: F.dropout(F.relu(h), p, tr))
    plain = run()
    for k in fast[0]:
        if torch.is_tensor(fast[0][k]):
            torch.testing.assert_close(fast[0][k], plain[0][k], msg=k)
    torch.testing.assert_close(fast[1], plain[1])
    assert all(v is not None for v in fast[2].values()) or head == "event_memory"
    for n in fast[2]:
        if fast[2][n] is None:
            assert plain[2][n] is None, n
            continue
        torch.testing.assert_close(fast[2][n], plain[2][n], msg=n)
