DKIM-Signature: v=1; a=ed25519-sha256; c=simple/relaxed; d=example.com; s=ed;
	t=1700000000; x=1700604800; h=from:from:to:to:cc:subject:subject:date
	:message-id:received:received;
	bh=udOfD7NsUr9kcfHmXWRj3h5KWA2UXf3RchdsDcK5lPs=; b=/UCHTxhes2Gd9CF0Nur
	MsSQXaHTaJSdmOc2OAAFT3gH/Vt2aik+arARcM5ZiQbpQLK7n2Tzh+vxBKq4BE2w+Bw==
