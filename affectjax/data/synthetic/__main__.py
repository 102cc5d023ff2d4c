"""`python -m affectjax.data.synthetic --out DIR ...`: writes a synthetic Aff-Wild2."""
from affectjax.data.synthetic import generate

if __name__ == '__main__':
  generate.main()
