set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
which ncu nsys 2>&1 | head -3
SO=$(ls ep_runtime/_C*.so | head -1); cp $SO /tmp/base.so
CMD=$(grep "nvcc -c .*grouped_gemm_sm90.cu" /tmp/build.log | head -1)
LINK=$(grep "nvcc -shared" /tmp/build.log | head -1)
for V in ${VARIANTS:-0 1 2 3}; do
  if [ "$V" != 0 ]; then eval "$CMD -DEP_PROBE=$V" && eval "$LINK" && cp build/lib*/ep_runtime/_C*.so $SO; fi
  echo "variant $V: $(python3 bench/probe.py 2>&1 | tail -1)"
done
