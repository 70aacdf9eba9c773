"""Windows of this checkout against another version of geometry.py (/tmp/prof/old_geometry.py, e.g. git show 9111158:ase_crystalformer/geometry.py > /tmp/prof/old_geometry.py): every field equal on 1,024 MP structures and five supercells/slabs, and time per structure (docs/benchmarks.md). Run from /tmp:

    mkdir -p /tmp/prof && git show 9111158:ase_crystalformer/geometry.py > /tmp/prof/old_geometry.py && python scripts/perf/windows_against.py
"""
import sys, time
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2] / 'benchmarks'))
import _common, numpy as np, types
from dataclasses import fields
from ase_crystalformer import geometry as new
src = open('/tmp/prof/old_geometry.py').read()
old = types.ModuleType('ase_crystalformer.old_geometry'); old.__package__ = 'ase_crystalformer'
exec(compile(src, 'old_geometry.py', 'exec'), old.__dict__)
atoms, _ = _common.load_first(_common.default_data(), 1024)
from ase.build import bulk
extra = [bulk('Al','fcc',a=4.05)*(3,3,3), bulk('Si','diamond',a=5.43)*(2,2,2), atoms[5]*(3,3,3), bulk('Al','fcc',a=4.05)*(17,17,17)]
for a in extra:
    a.pbc = True
extra.append(extra[0].copy()); extra[-1].pbc = (True, True, False)
for a, b in zip(old.windows_for(atoms + extra, 10.0, threads=1), new.windows_for(atoms + extra, 10.0, threads=1)):
    for f in fields(a):
        assert np.array_equal(getattr(a, f.name), getattr(b, f.name)), f.name
        assert getattr(a, f.name).dtype == getattr(b, f.name).dtype, f.name
print('identical windows for', len(atoms) + len(extra))
for r in range(3):
    for name, m in (('old', old), ('new', new)):
        m._minkowski_reduced.cache_clear()
        s = time.perf_counter(); m.windows_for(atoms, 10.0, threads=1); print(name, round((time.perf_counter()-s)/len(atoms)*1e6), 'us/structure')
