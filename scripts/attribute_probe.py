"""The attribute probe: how well a *linear* reader of the true attributes finds people in a
model's image space, next to what the model's text tower does.

  attribute_probe.py split DATA OUT          a query/gallery folder of DATA's training people
  attribute_probe.py probe TRAIN.jsonl TEST.jsonl [pooled|neck]

`split` writes OUT with two query images per training person (different cameras) and the rest
as gallery, for `plipd eval --data OUT --embeddings ...`. `probe` fits ridge regression from the
one-hot true attributes to the unit image embeddings of the training people (TRAIN.jsonl, from
`plipd eval --embeddings` on the split), then ranks the held-out gallery (TEST.jsonl) by each
held-out query image's predicted embedding: attribute→image R@1, the score of a perfect caption
read linearly. It prints that beside the text tower's text→image R@1 from the same file. With
the `both` joint feature the embedding holds pooled and neck side by side; pick one.
"""
import collections, json, os, shutil, sys
import numpy as np


def split(data, out):
    recs = json.load(open(os.path.join(data, 'synthpedes.json')))
    by = collections.defaultdict(list)
    for e in recs:
        if e['split'] == 'train':
            by[e['id']].append(e)
    for d in ('query', 'bounding_box_test'):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    written = []
    for _, es in sorted(by.items()):
        cams, query = set(), []
        for e in es:
            if len(query) < 2 and e['camera'] not in cams:
                query.append(id(e))
                cams.add(e['camera'])
        for e in es:
            name = os.path.basename(e['file_path'])
            folder = 'query' if id(e) in query else 'bounding_box_test'
            shutil.copy(os.path.join(data, e['file_path']), os.path.join(out, folder, name))
            written.append(dict(e, file_path=f'{folder}/{name}',
                                split='query' if folder == 'query' else 'gallery'))
    json.dump(written, open(os.path.join(out, 'synthpedes.json'), 'w'))
    print(json.dumps({"people": len(by), "images": len(written)}))


def flat(d, pre=''):
    out = []
    for k, v in sorted(d.items()):
        out += flat(v, f'{pre}{k}.') if isinstance(v, dict) else [f'{pre}{k}={v}']
    return out


def read(path, part):
    imgs, caps = [], []
    for line in open(path):
        r = json.loads(line)
        e = np.array(r['embedding'], dtype=np.float64)
        if part is not None:
            h = len(e) // 2
            e = e[:h] if part == 'pooled' else e[h:]
        r['e'] = e / (np.linalg.norm(e) + 1e-12)
        (imgs if r['kind'] == 'image' else caps).append(r)
    return imgs, caps


def probe(train, test, part):
    tr, _ = read(train, part)
    te, caps = read(test, part)
    feats = sorted({f for r in tr + te for f in flat(r['attributes'])})
    ix = {f: i for i, f in enumerate(feats)}

    def x(rs):
        m = np.zeros((len(rs), len(feats) + 1))
        m[:, -1] = 1
        for i, r in enumerate(rs):
            for f in flat(r['attributes']):
                m[i, ix[f]] = 1
        return m

    def r1(q, qp, gal):
        g = np.stack([r['e'] for r in gal])
        gp = np.array([r['person'] for r in gal])
        return float(np.mean(gp[(q @ g.T).argmax(1)] == np.array(qp)))

    gal = [r for r in te if r['split'] == 'gallery']
    qry = [r for r in te if r['split'] == 'query']
    w = np.linalg.solve(x(tr).T @ x(tr) + np.eye(len(feats) + 1), x(tr).T @ np.stack([r['e'] for r in tr]))
    out = {"attribute_features": len(feats), "part": part or "whole",
           "linear_attribute_r1": r1(x(qry) @ w, [r['person'] for r in qry], gal)}
    if part != 'pooled':
        out["text_r1"] = r1(np.stack([c['e'] for c in caps]), [c['person'] for c in caps], gal)
    print(json.dumps(out))


if __name__ == '__main__':
    if len(sys.argv) >= 4 and sys.argv[1] == 'split':
        split(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == 'probe':
        probe(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        sys.exit(__doc__)
