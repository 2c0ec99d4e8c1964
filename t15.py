import socket, time, subprocess
from collections import Counter
GW=('127.0.0.1',31120)
def m():
    out=subprocess.run(['curl','-s','127.0.0.1:31121/metrics'],capture_output=True,text=True).stdout
    return sorted(l for l in out.splitlines() if ('rate_limit' in l or 'proxy_protocol' in l) and not l.startswith('#'))
def one(src, pp, req=b'GET / HTTP/1.1\r\nHost: gw.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n', keep=False):
    s=socket.socket(); s.bind((src,0)); s.connect(GW); s.sendall(pp+req); s.settimeout(1)
    try: d=s.recv(4000)
    except Exception as e: d=repr(e).encode()
    if not keep: s.close()
    return d, s
d,_=one('127.0.0.1', b'PROXY TCP4 10.1.1.1 10.0.0.1 5555 80\r\n'); print(d.decode()[-150:])
d,_=one('127.0.0.2', b'PROXY TCP4 10.1.1.1 10.0.0.1 5555 80\r\n'); print('untrusted src w/ PROXY:', d[:60])
d,_=one('127.0.0.2', b''); print('untrusted src w/o PROXY:', d[:40])
d,_=one('127.0.0.1', b''); print('trusted src w/o PROXY:', d[:60])
d,_=one('127.0.0.1', b'PROXY UNKNOWN\r\n'); print('UNKNOWN:', d.decode()[-120:])
# v2 LOCAL
v2=b'\r\n\r\n\x00\r\nQUIT\n'+bytes([0x20,0x00,0x00,0x00])
d,_=one('127.0.0.1', v2); print('v2 LOCAL:', d.decode()[-120:])
# cap on the proxied address: 70 conns claiming 10.2.2.2, paced
res=[];socks=[]
for i in range(70):
    d,s=one('127.0.0.1', b'PROXY TCP4 10.2.2.2 10.0.0.1 %d 80\r\n'%(6000+i), keep=True); socks.append(s)
    res.append('ok' if d.startswith(b'HTTP/1.1 200') else d[:15]); time.sleep(1/15)
print('cap via PROXY', Counter(res))
for s in socks: s.close()
print(m())
