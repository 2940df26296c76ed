"""TF-IDF + logistic-regression baseline for the fortunes linear probe (not run in CI).

    python tfidf_baseline.py fortunes.parquet [max_docs] [seed]
Uses the same documents (first max_docs rows) and a stratified 20% test split, as
`ssl eval text` does (its split is seeded differently, so the test rows differ; sizes match).
"""
import json, sys
import pyarrow.parquet as pq
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

path = sys.argv[1]
max_docs = int(sys.argv[2]) if len(sys.argv) > 2 else 0
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
t = pq.read_table(path, columns=["text", "label"]).to_pydict()
texts, labels = t["text"], t["label"]
if max_docs:
    texts, labels = texts[:max_docs], labels[:max_docs]
xtr, xte, ytr, yte = train_test_split(texts, labels, test_size=0.2, stratify=labels, random_state=seed)
vec = TfidfVectorizer(sublinear_tf=True, min_df=2, ngram_range=(1, 2), max_features=50000)
a = vec.fit_transform(xtr)
clf = LogisticRegression(max_iter=2000, C=10.0).fit(a, ytr)
acc = clf.score(vec.transform(xte), yte)
print(json.dumps({"baseline": "tfidf(1-2gram)+logreg", "n_train": len(ytr), "n_test": len(yte),
                  "n_classes": len(set(labels)), "accuracy": acc}))
