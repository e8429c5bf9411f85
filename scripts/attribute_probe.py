"""The attribute probe: how well a *linear* reader of the true attributes finds people in a
model's image space, next to what the model's text tower does.

  attribute_probe.py split DATA OUT          a query/gallery folder of DATA's training people
  attribute_probe.py probe TRAIN.jsonl TEST.jsonl [pooled|neck]
  attribute_probe.py readings TEST.jsonl

`readings` reads the attribute head's outputs from `plipd eval --embeddings` (a model with the
head): its accuracy per field on the images and on the captions, and text→image R@1 when the
captions rank the gallery by each way of matching the two sides' readings — alone and beside
the cosine similarity — and by the captions' *true* attributes (a perfect caption reader).

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


def readings(test):
    imgs, caps = [], []
    for line in open(test):
        r = json.loads(line)
        if 'attribute_readings' not in r:
            sys.exit('no attribute readings: the model has no attribute head')
        r['p'] = np.array(r['attribute_readings'])
        e = np.array(r['embedding'])
        r['e'] = e / (np.linalg.norm(e) + 1e-12)
        (imgs if r['kind'] == 'image' else caps).append(r)
    gal = [r for r in imgs if r['split'] == 'gallery']
    qry = [r for r in imgs if r['split'] == 'query']
    fields = sorted({(a[0], a[1]) for r in imgs for a in r['attribute_labels']})
    out = {"fields": len(fields), "gallery": len(gal), "captions": len(caps)}

    def acc(rows):
        per = []
        for (s, n) in fields:
            hit = [int(np.argmax(r['p'][s:s + n])) == a[2]
                   for r in rows for a in r['attribute_labels'] if a[0] == s]
            per.append(round(float(np.mean(hit)), 3) if hit else None)
        return per
    out["image_field_accuracy"] = acc(gal + qry)
    out["caption_field_accuracy"] = acc(caps)

    g = np.stack([r['p'] for r in gal])
    logg = np.log(np.clip(g, 1e-4, 1))
    c = np.stack([r['p'] for r in caps])
    onehot = np.zeros_like(c)
    truth = np.zeros_like(c)
    for i, r in enumerate(caps):
        for (s, n) in fields:
            onehot[i, s + int(np.argmax(r['p'][s:s + n]))] = 1
        for a in r['attribute_labels']:
            truth[i, a[0] + a[2]] = 1
    cos = np.stack([r['e'] for r in caps]) @ np.stack([r['e'] for r in gal]).T
    gp = np.array([r['person'] for r in gal])
    cp = np.array([r['person'] for r in caps])
    F = len(fields)

    def r1(score):
        return round(float(np.mean(gp[score.argmax(1)] == cp)), 4)
    scores = {
        "agreement": c @ g.T / F,
        "loglik": c @ logg.T / F,
        "loglik_argmax": onehot @ logg.T / F,
        "loglik_true_caption": truth @ logg.T / F,
    }
    out["cos"] = r1(cos)
    for k, v in scores.items():
        out[k] = r1(v)
        for lam in (0.1, 0.25, 0.5, 1, 2):
            out[f"cos+{lam}*{k}"] = r1(cos + lam * v)
    print(json.dumps(out, indent=1))


if __name__ == '__main__':
    if len(sys.argv) >= 3 and sys.argv[1] == 'readings':
        readings(sys.argv[2])
        sys.exit(0)
    if len(sys.argv) >= 4 and sys.argv[1] == 'split':
        split(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == 'probe':
        probe(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        sys.exit(__doc__)
