"""Small real programs using cells, run with torch.nn then rnnkit (same seed), interleaved:
(a) a seq2seq GRU decoder with attention trained with teacher forcing (B=32, H=256, T=20),
(b) an RL-style LSTMCell policy stepping one observation at a time (B=1, H=64, inference),
(c) a character model trained with an LSTMCell loop in float64 (B=16, H=128, T=32)."""
import sys, time, torch, torch.nn as nn, rnnkit
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)

def decoder(lib):
    torch.manual_seed(0)
    emb = nn.Embedding(100, 64); cell = lib.GRUCell(64 + 256, 256); out = nn.Linear(256, 100)
    params = [*emb.parameters(), *cell.parameters(), *out.parameters()]
    opt = torch.optim.Adam(params, 1e-3)
    enc = torch.randn(32, 10, 256); tgt = torch.randint(0, 100, (32, 20))
    def step():
        h = enc.mean(1); loss = 0
        for t in range(20):
            att = torch.softmax((enc @ h.unsqueeze(-1)).squeeze(-1), -1)
            ctx = (att.unsqueeze(-1) * enc).sum(1)
            h = cell(torch.cat([emb(tgt[:, t]), ctx], -1), h)
            loss = loss + nn.functional.cross_entropy(out(h), tgt[:, t])
        opt.zero_grad(); loss.backward(); opt.step()
    return step

def policy(lib):
    torch.manual_seed(0)
    cell = lib.LSTMCell(32, 64); head = nn.Linear(64, 4)
    obs = torch.randn(200, 1, 32)
    def step():
        with torch.no_grad():
            hx = None
            for t in range(200):
                hx = cell(obs[t], hx)
                head(hx[0]).argmax()
    return step

def charlm(lib):
    torch.manual_seed(0)
    emb = nn.Embedding(80, 32).double(); cell = lib.LSTMCell(32, 128).double(); out = nn.Linear(128, 80).double()
    opt = torch.optim.SGD([*emb.parameters(), *cell.parameters(), *out.parameters()], 0.1)
    data = torch.randint(0, 80, (33, 16))
    def step():
        hx = None; loss = 0
        for t in range(32):
            hx = cell(emb(data[t]), hx)
            loss = loss + nn.functional.cross_entropy(out(hx[0]), data[t + 1])
        opt.zero_grad(); loss.backward(); opt.step()
    return step

for name, make in (("decoder GRUCell train", decoder), ("policy LSTMCell infer", policy), ("charlm LSTMCell f64 train", charlm)):
    runs = {"torch.nn": make(nn), "rnnkit": make(rnnkit)}
    for r in runs.values():
        r(); r()
    times = {k: [] for k in runs}
    for _ in range(7):
        for k, r in runs.items():
            t0 = time.perf_counter(); r(); r(); times[k].append((time.perf_counter() - t0) / 2)
    med = {k: sorted(v)[3] for k, v in times.items()}
    print(f"{name:26} torch.nn {med['torch.nn']*1e3:8.2f} ms  rnnkit {med['rnnkit']*1e3:8.2f} ms  x{med['torch.nn']/med['rnnkit']:.2f}", flush=True)
