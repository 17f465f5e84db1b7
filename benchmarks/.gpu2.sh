export PYTHONPATH=$PWD OMP_NUM_THREADS=4 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_cache_$$
python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "compiled or ranking" --tb=line 2>&1 | grep -v Warn | tail -8
for run in cold warm; do
python benchmarks/gpu_bench.py prune --shape llama2-7b --methods wanda,ria --patterns unstructured,2:4 --compile on --tag ${run}cache_ --out $OUT 2>&1 | grep "^prune"
done
