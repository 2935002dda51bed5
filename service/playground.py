"""GET /: a one-page playground that lists the models, draws images from generators and sends
an uploaded picture through translation and super-resolution models."""
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ganserve</title>
<style>body{font-family:system-ui,sans-serif;max-width:760px;margin:2em auto;color:#222}
label{margin-right:1em}img{image-rendering:pixelated;border:1px solid #ccc;margin-top:1em;max-width:100%}</style></head>
<body><h1>ganserve</h1>
<p><label>model <select id="model"></select></label>
<label>seed <input id="seed" type="number" value="0" min="0" style="width:6em"></label>
<label>images <input id="n" type="number" value="16" min="1" max="256" style="width:4em"></label>
<label>class <input id="cls" placeholder="(any)" style="width:5em"></label>
<button id="go">generate</button></p>
<p><label>image for translate / upscale models <input id="file" type="file" accept="image/png,image/jpeg,image/webp"></label></p>
<div id="status"></div><img id="out" alt="">
<p><a href="/docs">API docs</a> · <a href="/metrics">metrics</a> · <a href="/health/ready">readiness</a></p>
<script>
const $ = id => document.getElementById(id);
const kinds = {};
const endpoints = {translation: 'translate', super_resolution: 'upscale'};
fetch('/v1/models').then(r => r.json()).then(d => {
  for (const m of d.models) { kinds[m.name] = m.kind; const o = document.createElement('option'); o.value = m.name; o.textContent = `${m.name} (${m.kind}, v${m.latest_version})`; $('model').appendChild(o); }
});
$('go').onclick = async () => {
  const body = {seed: +$('seed').value, n: +$('n').value, columns: 8};
  if ($('cls').value !== '') body['class'] = isNaN(+$('cls').value) ? $('cls').value : +$('cls').value;
  const t = performance.now();
  const name = $('model').value, endpoint = endpoints[kinds[name]];
  let r;
  if (endpoint) {
    const file = $('file').files[0];
    if (!file) { $('status').textContent = `choose an image for this ${kinds[name]} model`; return; }
    const form = new FormData(); form.append('file', file);
    r = await fetch(`/v1/models/${name}/${endpoint}`, {method: 'POST', body: form});
  } else {
    r = await fetch(`/v1/models/${name}/generate`, {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify(body)});
  }
  if (!r.ok) { $('status').textContent = (await r.json()).error.message; return; }
  $('out').src = URL.createObjectURL(await r.blob()); $('out').width = 512;
  $('status').textContent = `${r.status} in ${(performance.now() - t).toFixed(0)} ms`;
};
</script></body></html>
"""
