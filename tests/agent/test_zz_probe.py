import json, shutil
def test_probe(real_bundle):
    print(real_bundle)
    shutil.copytree(real_bundle, "/tmp/probe_bundle", dirs_exist_ok=True)
