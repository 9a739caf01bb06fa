"""The interactive docs work offline and describe every endpoint, with the docs/examples bodies."""
import re


def test_docs_pages_use_only_local_assets(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert urls, page
        for url in urls:
            assert not url.startswith(("http:", "https:", "//")), (page, url)
            if url.startswith("/"):
                r = client.get(url)
                assert r.status_code == 200 and len(r.content) > 1000, url


def test_every_operation_is_described_and_examples_are_shown(make_client):
    from models.checkpoint import default_checkpoint_dir, load_models

    client = make_client(models=load_models(default_checkpoint_dir()))
    client.manager.pause()  # validated and queued, not run
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("description") or op.get("summary"), (method, path)
    examples = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert {"phantom-request", "darcy-inverse-request"} <= set(examples)
    # and each example is a request the service accepts
    for name, ex in examples.items():
        r = client.post("/v1/jobs", json=ex["value"])
        assert r.status_code == 202, (name, r.text)
        client.delete(f"/v1/jobs/{r.json()['id']}")
